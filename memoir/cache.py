"""The model cache under `$MEMOIR_CACHE`: directories built once per machine, atomically.

`build_once` is the one pattern every cached model uses (the built-in tiny model, SmolLM2,
converted GGUF files): under a file lock, build into a temporary directory beside the target,
then rename it into place, so concurrent callers wait for one build and a crash never leaves a
half-written model where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$MEMOIR_CACHE`, else `~/.cache/memoir`."""
    return Path(cache_dir or os.environ.get("MEMOIR_CACHE") or Path.home() / ".cache" / "memoir")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (blocks until other holders release it)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(root: Path, name: str, build: Callable[[Path], object],
               is_complete: Callable[[Path], bool]) -> Path:
    """`root/name`, made by `build(tmp_dir)` unless `is_complete` says it is already there.

    The build runs under the lock `root/name.lock`, into `root/.name.tmp-*`, which is renamed
    to `root/name` when `build` returns (and removed when it raises). Leftovers of a killed
    build and an incomplete target are replaced."""
    target = root / name
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{name}.lock"):
        if is_complete(target):  # another process finished it while we waited
            return target
        for stale in root.glob(f".{name}.tmp-*"):  # left by a crash; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete or foreign: replace it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


__all__ = ["build_once", "cache_root", "file_lock"]
