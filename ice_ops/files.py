"""Atomic file writes: temporary files beside their targets, then renames. Nothing is replaced unless asked.

A set of files that belong together (a concept set and its embeddings, the masks and overlay of one run) is
written by :func:`write_files_atomic` as one: either every file arrives or none does. New files get the
permissions the process's umask gives any new file (``tempfile`` alone would leave them readable by their
owner only, so that a ComfyUI running as another user could not read them). :func:`read_safetensors` reads a
user's weights file with an error that names it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Mapping

TEMPORARY_PREFIX = ".ice_tmp_"
NEW_FILE_MODE = 0o666  # what open() asks for; the umask then takes away what the user does not allow
PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux); otherwise set and
    restored at once."""
    try:
        with open(PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(paths, overwrite: bool) -> None:
    """``ValueError`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if os.path.exists(path):
            raise ValueError(f"{path} already exists; choose another name or allow overwriting.")


def write_atomic(path: str, write: Callable[[str], None], *, overwrite: bool = False) -> str:
    """Call ``write(temporary_path)`` and rename the result to ``path``; refuse to replace a file unless asked.

    Readers never see half a file, and a failed write leaves nothing behind.
    """
    refuse_existing([path], overwrite)
    temporary = _temporary_beside(path)
    try:
        write(temporary)
        _give_default_permissions(temporary)
        refuse_existing([path], overwrite)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_bytes_atomic(path: str, payload: bytes, *, overwrite: bool = False) -> str:
    """Write ``payload`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda temporary: _write_bytes(temporary, payload), overwrite=overwrite)


def write_files_atomic(payloads: Mapping[str, bytes], *, overwrite: bool = False) -> list[str]:
    """Write several files as one: all of them are written to temporaries first and renamed into place only
    when every write succeeded. If anything fails (a full disk, a name the system refuses), what was written
    is removed, files that were being replaced are put back, and the error is raised. Returns the paths."""
    paths = list(payloads)
    refuse_existing(paths, overwrite)
    created_folders = _make_folders(paths)
    temporaries: dict[str, str] = {}
    backups: dict[str, str] = {}
    committed: list[str] = []
    try:
        for path in paths:
            temporaries[path] = _temporary_beside(path)
            _write_bytes(temporaries[path], payloads[path])
            _give_default_permissions(temporaries[path])
        refuse_existing(paths, overwrite)
        for path in paths:
            if os.path.exists(path):
                backups[path] = _temporary_beside(path)
                os.replace(path, backups[path])
            os.replace(temporaries[path], path)
            del temporaries[path]
            committed.append(path)
    except BaseException:
        for path in committed:
            _remove_quietly(path)
        for path, backup in backups.items():
            os.replace(backup, path)
        for temporary in temporaries.values():
            _remove_quietly(temporary)
        for folder in reversed(created_folders):
            _remove_empty_folder(folder)
        raise
    for backup in backups.values():
        _remove_quietly(backup)
    return paths


def read_safetensors(path: str, what: str) -> dict:
    """The tensors of a ``.safetensors`` file; ``ValueError`` naming the file when it is not one (damaged,
    cut short, or another format renamed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"The {what} {path!r} cannot be read as .safetensors ({error}). The file is damaged or incomplete, "
            "or another format renamed (a .ckpt is not a .safetensors): download or convert it again."
        ) from None


def _temporary_beside(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
    os.close(handle)
    return temporary


def _write_bytes(path: str, payload: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())


def _give_default_permissions(path: str) -> None:
    os.chmod(path, NEW_FILE_MODE & ~current_umask())


def _make_folders(paths) -> list[str]:
    """Create the missing parent folders of ``paths``; returns those created, outermost first."""
    created: list[str] = []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        missing = []
        while folder and not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            if not os.path.isdir(folder):
                os.mkdir(folder)
                created.append(folder)
    return created


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_empty_folder(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (the user's files) or already gone
