"""Where the project keeps its caches: one root, overridable by the CMT_CACHE_DIR environment variable."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "CMT_CACHE_DIR"


def cache_root() -> Path:
    """The project's cache root: $CMT_CACHE_DIR, else $XDG_CACHE_HOME/cmt-pipeline, else ~/.cache/cmt-pipeline."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cmt-pipeline"


def trajectory_cache_root() -> Path:
    """Default directory of cached trajectory stores (`<cache root>/trajectories`)."""
    return cache_root() / "trajectories"
