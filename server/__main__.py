"""``python -m server [serve options]``: the same entry as ``qwenjax serve``."""
import sys

from server.cli import main

sys.exit(main())
