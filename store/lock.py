"""One writer per memory: an OS file lock (SQLite) or a PostgreSQL advisory lock, plus fencing.

Taking the lock also bumps the memory name's fencing token in the ledger. Before each commit
the store calls `check()`: the lock must still be held by this process and the token must
still be ours. A writer that lost its lock (its database session died, its lock file was
removed, another writer took over) is stopped before it writes anything more.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Callable

import peewee as pw

from store.files import FILE_MODE, private_dir
from store.models import Tables
from store.records import FencingError, WriterLockedError, utcnow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
ADVISORY_NAMESPACE = 0x4D454D4F  # "MEMO": the first int4 key of pg_advisory_lock(int4, int4)


class _FileBackend:
    """fcntl.flock on `<store>/locks/<name>.lock`; the holder writes its pid and host into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "an unknown process"
        return f"pid {pid} on {host}" if pid else "an unknown process"

    def still_held(self) -> bool:
        if self.fd is None:
            return False
        try:
            return os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False  # the lock file was removed: another process may lock a new one

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _AdvisoryBackend:
    """pg_try_advisory_lock on this session (the store's connection for this thread)."""

    def __init__(self, db: pw.Database, tables: Tables, name: str) -> None:
        self.db, self.tables, self.name = db, tables, name
        # one lock per (database, schema, memory): separate ledgers on one server do not collide
        database, schema = db.execute_sql("SELECT current_database(), current_schema()").fetchone()
        self.key = (ADVISORY_NAMESPACE, zlib.crc32(f"{database}.{schema}.{name}".encode()) - (1 << 31))
        self.held = False

    def try_acquire(self) -> bool:
        self.held = bool(self.db.execute_sql("SELECT pg_try_advisory_lock(%s::int4, %s::int4)", self.key).fetchone()[0])
        return self.held

    def holder(self) -> str:
        row = self.tables.Writer.get_or_none(self.tables.Writer.name == self.name)
        return f"pid {row.pid} on {row.host}" if row else "another session"

    def still_held(self) -> bool:
        if not self.held:
            return False
        # pg_locks shows the two int4 keys as unsigned oids
        sql = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
               "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 2 AND granted")
        try:
            return self.db.execute_sql(sql, tuple(k & 0xFFFFFFFF for k in self.key)).fetchone()[0] > 0
        except pw.DatabaseError:
            return False

    def release(self) -> None:
        if self.held:
            self.db.execute_sql("SELECT pg_advisory_unlock(%s::int4, %s::int4)", self.key)
            self.held = False


class WriterLock:
    """The right to write to one memory. Use as a context manager or call `release()`."""

    def __init__(self, name: str, tables: Tables, backend: _FileBackend | _AdvisoryBackend, token: int,
                 on_release: Callable[[], None] | None = None) -> None:
        self.name, self.tables, self.backend, self.token = name, tables, backend, token
        self.on_release = on_release

    @classmethod
    def acquire(cls, name: str, tables: Tables, lock_dir: Path | None, wait: float = 0.0,
                on_release: Callable[[], None] | None = None) -> "WriterLock":
        """Take the lock; `wait` seconds (0: fail at once, math.inf: forever) before WriterLockedError."""
        if lock_dir is not None:
            backend: _FileBackend | _AdvisoryBackend = _FileBackend(lock_dir / f"{name}.lock")
        else:
            backend = _AdvisoryBackend(tables.db, tables, name)
        deadline = time.monotonic() + wait if math.isfinite(wait) else math.inf
        while not backend.try_acquire():
            if time.monotonic() >= deadline:
                raise WriterLockedError(f"memory {name!r} has a writer already: {backend.holder()} holds its lock")
            time.sleep(POLL_SECONDS)
        try:
            token = cls._bump_token(tables, name)
        except BaseException:
            backend.release()
            raise
        return cls(name, tables, backend, token, on_release)

    @staticmethod
    def _bump_token(tables: Tables, name: str) -> int:
        Writer = tables.Writer
        with tables.db.atomic():
            row = Writer.get_or_none(Writer.name == name)
            token = (row.token if row else 0) + 1
            fields = {"token": token, "pid": os.getpid(), "host": socket.gethostname(), "acquired_at": utcnow()}
            if row is None:
                Writer.create(name=name, **fields)
            else:
                Writer.update(**fields).where(Writer.name == name).execute()
        return token

    @property
    def held(self) -> bool:
        return self.backend.still_held()

    def check(self) -> None:
        """Fencing: raise FencingError unless this lock is still held and its token still current.

        A PostgreSQL lock lost with its database session (the store reconnected) is taken again,
        and kept only if no other writer took the memory meanwhile (the token is still ours)."""
        retaken = False
        if not self.backend.still_held():
            retaken = isinstance(self.backend, _AdvisoryBackend) and self.backend.try_acquire()
            if not retaken:
                raise FencingError(f"the writer lock of memory {self.name!r} is no longer held by this process")
        row = self.tables.Writer.get_or_none(self.tables.Writer.name == self.name)
        if row is None or row.token != self.token:
            if retaken:
                self.backend.release()
            holder = f"pid {row.pid} on {row.host}" if row else "nobody"
            raise FencingError(f"memory {self.name!r} was taken over by {holder}; this writer (token {self.token}) must stop")
        if retaken:
            log.warning("writer lock of memory %r taken again on a new database session (token %d)", self.name,
                        self.token)

    def release(self) -> None:
        self.backend.release()
        if self.on_release is not None:
            self.on_release()

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
