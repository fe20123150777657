"""Where things live on disk. Nothing here hard-codes a dataset location: the data root is a setting."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "ANGELMED_DATA_ROOT"


def data_root(explicit: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """The medical data root: the explicit argument, else $ANGELMED_DATA_ROOT, else None (or an error)."""
    value = explicit if explicit is not None else os.environ.get(DATA_ROOT_ENV)
    if value is None:
        if required:
            raise FileNotFoundError(
                f"no data root given: pass --data-root DIR or set {DATA_ROOT_ENV} (e.g. ../shared/data)"
            )
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
    return root


def cache_root() -> Path:
    """angelmed's cache directory: $XDG_CACHE_HOME/angelmed, else ~/.cache/angelmed."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "angelmed"
