"""Atomic file writes: a temporary file in the target folder, then one rename. Nothing is replaced unless asked."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None], *, overwrite: bool = False) -> str:
    """Call ``write(temporary_path)`` and rename the result to ``path``; refuse to replace a file unless asked.

    Readers never see half a file, and a failed write leaves nothing behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; choose another name or allow overwriting.")
    handle, temporary = tempfile.mkstemp(prefix=".ice_tmp_", dir=folder)
    os.close(handle)
    try:
        write(temporary)
        if not overwrite and os.path.exists(path):
            raise ValueError(f"{path} already exists; choose another name or allow overwriting.")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_bytes_atomic(path: str, payload: bytes, *, overwrite: bool = False) -> str:
    """Write ``payload`` to ``path`` atomically (see :func:`write_atomic`)."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())

    return write_atomic(path, write, overwrite=overwrite)
