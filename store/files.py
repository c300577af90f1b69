"""Content-addressed, owner-only tensor files, written atomically (temp file, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_SUFFIX = ".tmp"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def private_dir(path: str | os.PathLike) -> Path:
    """Create `path` and its missing parents owner-only; existing directories are left as they are."""
    path = Path(path)
    if not path.is_dir():
        private_dir(path.parent)
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_content_addressed(root: str | os.PathLike, subdir: str, data: bytes,
                            prefix: str = "") -> tuple[str, str]:
    """Store `data` as `<root>/<subdir>/<prefix><sha256>.safetensors`; returns (relative path, sha256).

    The bytes go to an owner-only temp file that is fsynced, then renamed into place and the
    directory fsynced: a crash leaves either no file or the whole file. Writing the same bytes
    twice finds the file already there (after checking its hash) and keeps it.
    """
    root = Path(root)
    sha = sha256_bytes(data)
    directory = private_dir(root / subdir)
    final = directory / f"{prefix}{sha}.safetensors"
    relative = final.relative_to(root).as_posix()
    if final.exists() and sha256_file(final) == sha:
        return relative, sha
    write_atomic(directory, final.name, data)
    return relative, sha


def write_atomic(directory: Path, name: str, data: bytes) -> Path:
    """Write `directory/name` through an owner-only temp file that is fsynced, renamed into
    place, and the directory fsynced: a crash leaves either no file or the whole file."""
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final
