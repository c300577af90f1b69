"""A private database on the machine's PostgreSQL (127.0.0.1:5432, trust auth) that a test can
take away and give back: terminate its sessions (`pg_terminate_backend`), refuse new ones
(`ALLOW_CONNECTIONS false`), allow them again. Each test gets its own `memoir_h3_<hex>` database,
dropped afterwards, so nothing here touches another test's data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class Database:
    """One database of the server, and the admin's hand on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"postgresql://postgres@127.0.0.1:5432/{name}"

    @staticmethod
    def admin(sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
        conn.autocommit = True
        try:
            cursor = conn.cursor()
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def terminate(self) -> int:
        """End every session on this database; returns how many there were."""
        rows = self.admin("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,))
        return int(rows[0][0])

    def refuse(self) -> int:
        """The database goes away: no new session, and those open are ended."""
        self.admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        return self.terminate()

    def allow(self) -> None:
        self.admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def sessions(self) -> int:
        return int(self.admin("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.name,))[0][0])


def available() -> bool:
    try:
        Database.admin("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return False


@pytest.fixture
def pg() -> Iterator[Database]:
    """A fresh, private database (dropped afterwards); skips when no PostgreSQL answers."""
    if not available():
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    db = Database(f"memoir_h3_{uuid.uuid4().hex[:12]}")
    db.admin(f'CREATE DATABASE "{db.name}"')
    try:
        yield db
    finally:
        db.admin(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
