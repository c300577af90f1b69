"""Ledger databases that come back after their connection was dropped (a PostgreSQL restart,
`pg_terminate_backend`, a SQLite file briefly locked), without ever replaying a write.

peewee's `ReconnectMixin` retries any statement that failed outside a transaction; here a
statement is sent again only when it cannot have changed anything:
- at a transaction's start (`BEGIN`): nothing of the transaction has run yet;
- a `SELECT` outside a transaction (peewee runs in autocommit mode);
- any statement outside a transaction when the driver already knows the session is gone (the
  statement was never sent).
Inside a transaction nothing is retried: the statement fails, the caller's transaction fails
(the server discarded it with the session) and the next transaction starts on a new session.
A write outside a transaction that meets a dead session is not sent again either: it may have
run. Retries are bounded (`retry_seconds`, doubling pauses up to 2 s) and logged; the first
statement on a new session logs "reconnected".

Session state does not survive: a PostgreSQL writer lock (an advisory lock of the session) is
taken again by `store.lock.WriterLock.check` only if no other writer took the memory meanwhile.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, TypeVar

import peewee as pw

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 10.0  # how long a statement waits for the database to come back
CONNECT_TIMEOUT = 5  # seconds (PostgreSQL), so that an unreachable host is one bounded try
FIRST_PAUSE, MAX_PAUSE = 0.1, 2.0


def retry_seconds() -> float:
    return float(os.environ.get("MEMOIR_DB_RETRY_SECONDS", DEFAULT_RETRY_SECONDS))


class Reconnecting:
    """Mixin for a peewee Database (before the database class in the bases)."""

    retry_seconds: float = DEFAULT_RETRY_SECONDS
    _lost_at: float | None = None

    # -- what is safe to send again ---------------------------------------------------------------
    def _session_lost(self) -> bool:
        """The driver knows this thread's session is gone (psycopg2 sets `closed` once it sees it)."""
        conn = self._state.conn
        return conn is not None and bool(getattr(conn, "closed", 0))

    def _transient(self, exc: Exception) -> bool:
        """An error that a new session (or a moment) can cure."""
        if isinstance(self, pw.SqliteDatabase):
            return isinstance(exc, pw.OperationalError) and "locked" in str(exc).lower()
        return isinstance(exc, (pw.OperationalError, pw.InterfaceError)) and (self.is_closed() or self._session_lost())

    def _drop_lost_session(self) -> None:
        if not self.in_transaction() and self._session_lost():
            self._mark_lost()

    def _mark_lost(self) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        with self._lock:
            conn = self._state.conn
            self._state.reset()
        try:
            if conn is not None:
                conn.close()
        except Exception:  # noqa: BLE001 - it is dead already
            pass

    def _retrying(self, what: str, run: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_seconds
        pause = FIRST_PAUSE
        while True:
            self._drop_lost_session()
            try:
                return run()
            except pw.DatabaseError as exc:
                if self.in_transaction() or not self._transient(exc) or time.monotonic() + pause > deadline:
                    if self._session_lost() and not self.in_transaction():
                        self._mark_lost()
                    raise
                log.warning("the ledger database is unavailable (%s: %s); retrying %s in %.1fs",
                            type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "", what,
                            pause)
                if not isinstance(self, pw.SqliteDatabase):
                    self._mark_lost()
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)

    # -- peewee's entry points ------------------------------------------------------------------------
    def open(self) -> None:
        """Connect (if not connected), waiting for the database as a statement would."""
        self._retrying("connecting", lambda: self.connect(reuse_if_open=True))

    def _initialize_connection(self, conn: Any) -> None:
        super()._initialize_connection(conn)  # type: ignore[misc]
        if self._lost_at is not None:
            log.warning("reconnected to the ledger database after %.1fs", time.monotonic() - self._lost_at)
            self._lost_at = None

    def begin(self, *args: Any, **kwargs: Any) -> None:
        """A transaction's start: nothing of it has run, so it can wait for a new session."""
        self._retrying("a transaction's start", lambda: super(Reconnecting, self).begin(*args, **kwargs))

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        run = lambda: super(Reconnecting, self).execute_sql(sql, params)  # noqa: E731
        if self.in_transaction():
            return run()
        if sql.lstrip()[:6].upper() == "SELECT":
            return self._retrying("a read", run)
        self._drop_lost_session()  # never sent on the dead session: safe to send on a new one
        try:
            return run()
        except pw.DatabaseError:
            if self._session_lost():
                self._mark_lost()  # not sent again (it may have run); the next statement reconnects
            raise

    def rollback(self) -> None:
        """A transaction that died with its session was discarded by the server: nothing to undo."""
        if self._session_lost() or self.is_closed():
            return
        super().rollback()  # type: ignore[misc]


class PostgresqlDatabase(Reconnecting, pw.PostgresqlDatabase):
    pass


class SqliteDatabase(Reconnecting, pw.SqliteDatabase):
    pass


def connect_url(url: str) -> pw.Database:
    """A database from a URL (playhouse.db_url): PostgreSQL and SQLite reconnect; other schemes
    are opened as peewee opens them."""
    from urllib.parse import urlparse

    from playhouse import db_url

    scheme = urlparse(url).scheme
    classes = {"postgres": PostgresqlDatabase, "postgresql": PostgresqlDatabase, "sqlite": SqliteDatabase}
    if scheme not in classes:
        return db_url.connect(url)
    params = db_url.parse(url)
    if not params.get("database"):
        return db_url.connect(url)  # peewee's own error for a URL without a database name
    if classes[scheme] is PostgresqlDatabase:
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    db = classes[scheme](**params)
    db.retry_seconds = retry_seconds()
    return db


def sqlite(path: str, **kwargs: Any) -> SqliteDatabase:
    db = SqliteDatabase(path, **kwargs)
    db.retry_seconds = retry_seconds()
    return db
