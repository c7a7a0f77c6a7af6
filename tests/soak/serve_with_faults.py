"""``qwenjax serve`` (the same ``server.cli.main``) with the test fault hooks of tests/faults.py.

Prompts starting with ``faults.RAISE_MARK`` make their step raise; prompts starting with
``faults.NAN_MARK`` get NaN logits after a few tokens. Every other request is served as usual.
Run from the repository root: ``python tests/soak/serve_with_faults.py --model … --port 0``.
"""
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import faults  # noqa: E402
from qwenjax.engine import engine as engine_module  # noqa: E402
from server.cli import main  # noqa: E402

_init = engine_module.Engine.__init__


def _init_with_faults(self, *args, **kwargs):
    _init(self, *args, **kwargs)  # warm-up first: the hooks wrap the compiled programs
    faults.install_marked_faults(self.runner)


engine_module.Engine.__init__ = _init_with_faults

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
