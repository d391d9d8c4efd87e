"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A killed process never leaves a torn file behind: readers see the old version or the new one.
A failed write (a read-only folder, a full disk, a file-size limit) leaves no temporary file,
and its ``OSError`` names the target, not the hidden temporary file nobody asked for.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden sibling ``replace_file`` writes before renaming it onto ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


_WRITING = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})  # errors of the file written


def naming(err: OSError, path: str | os.PathLike, *also: str | os.PathLike) -> OSError:
    """``err`` as an ``OSError`` (of the same errno subclass) naming ``path``, where it named
    no file or one of ``also`` (the temporary files written on ``path``'s behalf); a copy's
    error (``source -> temporary``) names ``source -> path``, or ``path`` alone where the
    errno is one of writing (a full disk)."""
    temporary = {str(a) for a in also}
    if err.filename is not None and str(err.filename) not in temporary:
        if err.filename2 is None or str(err.filename2) not in temporary or err.errno is None:
            return err
        if err.errno not in _WRITING:
            return OSError(err.errno, os.strerror(err.errno), err.filename, None, str(path))
    if err.errno is None:
        return OSError(f"{path}: {err}")
    # the system's words for the errno: a library's own (pyarrow's "Error writing bytes ...") say it less plainly
    return OSError(err.errno, os.strerror(err.errno), str(path))


def replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the result onto ``path``.

    Raises:
        OSError: the folder cannot be made, or the write or rename failed, naming ``path``
            (or the file the error was about, where it was not the temporary one); the
            temporary file is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder went read-only under us: nothing more to clean
            pass
        if isinstance(err, OSError):
            raise naming(err, path, tmp) from None
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path``, atomically."""
    return replace_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path``, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
