"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace.

A crash mid-write leaves the previous file intact, never a torn one. No torch here, so data.py can use it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(f) on a temporary file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    """numpy scalars and 0-dim tensors -> Python numbers; arrays and tensors -> lists."""
    if getattr(o, 'ndim', None) == 0:
        return o.item()
    if hasattr(o, 'tolist'):
        return o.tolist()
    raise TypeError(f'not JSON-serialisable: {type(o).__name__}')


def atomic_json_save(obj: Any, path: str | os.PathLike, **dumps_kwargs) -> None:
    """json.dumps(obj, indent=2, ...) written atomically; numpy values are converted."""
    blob = json.dumps(obj, indent=2, default=_json_default, **dumps_kwargs).encode()
    atomic_write(path, lambda f: f.write(blob))
