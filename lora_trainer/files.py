"""Writing files so that nothing is ever half-written: a temporary name in the same folder, then a rename.

A full disk or a kill in the middle leaves the old file (if any) intact and at most a ``.tmp-*``
file behind, which the next write of the same file removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import StorageError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``."""
    target = Path(target)
    _make_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
        os.close(fd)
    except OSError as exc:  # a full disk can refuse even an empty file
        raise StorageError(_explain(exc, target)) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a file should get the mode open() gives
        os.replace(tmp_path, target)
    except OSError as exc:
        raise StorageError(_explain(exc, target)) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(target: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``target``."""
    with atomic_path(target) as tmp:
        try:
            writer(tmp)
        except OSError as exc:
            raise StorageError(_explain(exc, target)) from None
    return Path(target)


def write_text_atomic(target: Path, text: str) -> Path:
    return write_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(target: Path, data: bytes) -> Path:
    return write_atomic(target, lambda tmp: tmp.write_bytes(data))


def copy_atomic(source: Path, target: Path) -> Path:
    return write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place when complete."""
    target = Path(target)
    _make_dir(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    except OSError as exc:
        raise StorageError(_explain(exc, target)) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise StorageError(_explain(exc, target)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    # os.umask can only be read by setting it; the WebUI's other threads may create files meanwhile, and
    # reading it back at once keeps that window to two system calls.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_run_dir(output_dir: Path, name: str) -> Path:
    """Create ``output_dir/name``, or ``name-2``, ``name-3``, ...: a run folder is never reused."""
    output_dir = Path(output_dir)
    _make_dir(output_dir)
    for n in range(1, 100_000):
        candidate = output_dir / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(_explain(exc, candidate)) from None
    raise StorageError(f"{output_dir}: too many runs named {name!r}; choose another output_name")


def storage_error(exc: OSError, path: Path) -> StorageError:
    """The one-line StorageError for an OSError met while writing ``path``."""
    return StorageError(_explain(exc, path))


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"{path}: exists and is not a folder; choose another output_dir") from None
    except OSError as exc:
        raise StorageError(_explain(exc, path)) from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _explain(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{path}: the disk is full; free some space (nothing was overwritten)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not allowed to write here; choose another output_dir"
    if exc.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder; choose another output_dir"
    return f"{path}: cannot write ({exc.strerror or exc}); check the folder or choose another output_dir"
