"""Where qwenjax keeps downloaded and converted model files."""
from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """`$QWENJAX_CACHE` if set, else `${XDG_CACHE_HOME:-~/.cache}/qwenjax`; created on demand."""
    override = os.environ.get("QWENJAX_CACHE")
    if override:
        root = pathlib.Path(override).expanduser()
    else:
        # An empty XDG_CACHE_HOME counts as unset, as the XDG spec asks.
        xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        root = pathlib.Path(xdg).expanduser() / "qwenjax"
    # Absolute, so paths handed out stay valid after a chdir.
    root = root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    return root
