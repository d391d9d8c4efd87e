"""Folders replaced whole: written in a temporary sibling, then swapped into place in one step.

A killed write leaves the previous complete folder (and a hidden ``.NAME.tmp-PID-*`` sibling
that the next write removes), never a half-written one. The swap is one ``renameat2(...,
RENAME_EXCHANGE)`` where Linux offers it; elsewhere two renames, the old folder set aside
first (a reader between them finds no folder, never a mix, and a write killed between them is
undone by the next). A reader that opens several files of a folder pins it with
``pinned_folder``, so a swap halfway through its reads cannot give it files of two versions.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (no ``renameat2``, or a file
    system without ``RENAME_EXCHANGE``)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[Path]:
    """Siblings ``.NAME.<kind>-PID-*`` left by writes whose process is gone."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*"):
        pid = p.name[len(f".{out.name}.{kind}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(p)
    return found


def recover(out: str | os.PathLike) -> bool:
    """Put back the folder a write killed between its two renames had set aside; whether it did."""
    out = Path(os.path.realpath(out))
    aside = _leftovers(out, "old") if not out.exists() else []
    if aside:
        try:
            os.rename(aside[-1], out)
        except OSError:  # another process put it back first, or a new write took the name
            return out.exists()
        return True
    return False


def _clear_leftovers(out: Path) -> None:
    recover(out)
    for p in _leftovers(out, "tmp") + _leftovers(out, "old"):
        shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old folder
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, aside)  # onto the empty directory mkdtemp made
    os.rename(tmp, out)
    shutil.rmtree(aside)


@contextlib.contextmanager
def replaced_folder(out: str | os.PathLike, marker: str, carry: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` to write the new folder into; on a clean
    exit it replaces ``out`` (which may not exist yet), on an exception it is removed.

    Args:
        marker: a file every folder of this kind holds; a non-empty ``out`` without it is
            someone else's folder and is never replaced.
        carry: start from ``out``'s files, hard-linked (copied where links are impossible),
            to change some of them. Files must then be replaced (``formats.atomic``), never
            written in place: a link shares the old folder's file.

    Raises:
        ValueError: ``out`` is a file, or a folder of something else.
    """
    out = Path(os.path.realpath(out))  # a link to a folder: the folder it names is replaced
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ValueError(f"{out} is a folder without {marker}: give a new or empty folder to write")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        if carry and out.is_dir():
            for f in out.iterdir():
                if f.is_file() and not f.is_symlink():
                    try:
                        os.link(f, tmp / f.name)
                    except OSError:
                        shutil.copy2(f, tmp / f.name)
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swapped(pinned: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``root`` names another folder than ``pinned`` (from ``pinned_folder``) now."""
    try:
        return os.stat(pinned).st_ino != os.stat(root).st_ino
    except OSError:
        return True


@contextlib.contextmanager
def pinned_folder(root: str | os.PathLike) -> Iterator[Path]:
    """A path that names the folder ``root`` names now, whatever is swapped in at ``root``
    while the caller reads (on Linux, ``/proc/self/fd/N`` of an open directory; elsewhere
    ``root`` itself)."""
    root = Path(root)
    proc = Path("/proc/self/fd")
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield root  # not a folder: the reader reports what is missing
        return
    try:
        yield proc / str(fd) if proc.is_dir() else root
    finally:
        os.close(fd)
