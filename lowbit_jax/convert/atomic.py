"""Write-to-temporary-then-rename, so a killed or failing writer never leaves a complete-looking output.

A checkpoint that is half written but sits under its final name is worse than none: the next
run trusts it. Every writer in :mod:`lowbit_jax.convert` therefore writes into a hidden sibling
(``.<name>.tmp-<random>``, same directory so the rename cannot cross filesystems) and moves it
into place with one ``os.replace``/``os.rename`` only after the last byte is flushed. On an
exception the temporary is removed; on SIGKILL it stays behind under a name no reader accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["TMP_MARKER", "atomic_file", "atomic_dir", "atomic_write_bytes", "is_temporary", "fsync_dir"]

PathLike = Union[str, os.PathLike]

# Every temporary this module creates has this in its name; readers can refuse such paths.
TMP_MARKER = ".tmp-"


def is_temporary(path: PathLike) -> bool:
    """True for a leftover temporary of an interrupted write (never a finished output)."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARKER in name


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry so the rename itself survives a power cut (POSIX only)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _check_target(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
    if not final.parent.is_dir():
        raise FileNotFoundError(f"parent directory of {final} does not exist")


@contextlib.contextmanager
def atomic_file(path: PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one step.

    The caller writes (and closes) the yielded file; if the body raises, the temporary is
    deleted and ``path`` is left exactly as it was.
    """
    final = Path(path)
    _check_target(final, overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARKER}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``path``.

    With ``overwrite=True`` an existing ``path`` is first moved aside (another hidden
    temporary) and deleted only after the new directory is in place, so at every instant
    either the old or the new complete directory holds the name.
    """
    final = Path(path)
    _check_target(final, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARKER}", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARKER}old-", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
