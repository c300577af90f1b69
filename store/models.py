"""The ledger's tables (peewee), the same on SQLite and PostgreSQL.

`Tables(db)` defines the model classes bound to one database, so that several stores (say a
SQLite file and a PostgreSQL server) can be open in one process without rebinding globals.
"""

from __future__ import annotations

import json
from typing import Any

import peewee as pw

SCHEMA_VERSION = 1
SCHEMA_LOCK = (0x4D454D4F, 0x5343484D)  # "MEMO", "SCHM": pg_advisory_xact_lock while the schema is created
APPEND_ONLY = "the event log is append-only"


class JsonField(pw.TextField):
    """JSON as text: portable across SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class Tables:
    """The ledger's model classes, bound to `db`."""

    def __init__(self, db: pw.Database) -> None:
        class Base(pw.Model):
            class Meta:
                database = db
                legacy_table_names = False

        class StoreInfo(Base):
            """Key/value facts about the store itself (schema version)."""

            key = pw.CharField(primary_key=True, max_length=64)
            value = pw.TextField()

        class Memory(Base):
            name = pw.CharField(unique=True, max_length=128)
            model_id = pw.TextField()
            revision = pw.TextField(null=True)
            config = JsonField()
            seed = pw.BigIntegerField()
            metadata = JsonField()
            hidden_size = pw.IntegerField()
            intermediate_size = pw.IntegerField()
            layer = pw.IntegerField()
            top_k = pw.IntegerField()
            state_file = pw.TextField()
            state_sha256 = pw.CharField(max_length=64)
            version = pw.BigIntegerField(default=0)
            checkpoint_every = pw.IntegerField()
            policy = JsonField(default=dict)
            created_at = pw.DateTimeField()

        class Edit(Base):
            memory = pw.ForeignKeyField(Memory, backref="edits", on_delete="RESTRICT")
            seq = pw.BigIntegerField()
            request_id = pw.CharField(unique=True, max_length=255)
            payload_sha256 = pw.CharField(max_length=64)
            prompt = pw.TextField()
            target = pw.TextField()
            rephrases = JsonField(default=list)
            metadata = JsonField(default=dict)
            status = pw.CharField(max_length=16, index=True)
            reason = pw.TextField(null=True)
            created_at = pw.DateTimeField()
            updated_at = pw.DateTimeField()
            applied_at = pw.DateTimeField(null=True)
            rolled_back_at = pw.DateTimeField(null=True)
            mask = pw.BlobField(null=True)  # D-bit bitmap of the k columns (records.encode_mask)
            mask_size = pw.IntegerField(null=True)
            loss = pw.DoubleField(null=True)
            losses = JsonField(null=True)
            steps = pw.IntegerField(null=True)
            seconds = pw.DoubleField(null=True)
            scores = JsonField(null=True)
            unrelated = pw.TextField(null=True)
            delta_file = pw.TextField(null=True)  # relative to the tensor directory
            delta_sha256 = pw.CharField(max_length=64, null=True)
            delta_format = pw.CharField(max_length=16, null=True)  # "factored" | "dense"
            delta_bytes = pw.BigIntegerField(null=True)
            applied_version = pw.BigIntegerField(null=True)
            replaces = pw.ForeignKeyField("self", null=True, backref="replaced_by", on_delete="RESTRICT")

            class Meta:
                indexes = ((("memory", "seq"), True),)

        class Event(Base):
            """Append-only: rows are inserted, never updated or deleted."""

            memory = pw.ForeignKeyField(Memory, backref="events", on_delete="RESTRICT")
            edit = pw.ForeignKeyField(Edit, null=True, backref="events", on_delete="RESTRICT")
            kind = pw.CharField(max_length=32)
            actor = pw.TextField()
            time = pw.DateTimeField()
            detail = JsonField(default=dict)

        class Checkpoint(Base):
            memory = pw.ForeignKeyField(Memory, backref="checkpoints", on_delete="RESTRICT")
            version = pw.BigIntegerField()
            file = pw.TextField()
            sha256 = pw.CharField(max_length=64)
            bytes = pw.BigIntegerField()
            members = JsonField()  # old form: {edit id: delta sha256} it holds; now "{}", its file lists them
            created_at = pw.DateTimeField()

        class Writer(Base):
            """Fencing tokens: each writer lock taken on a memory name bumps its token."""

            name = pw.CharField(primary_key=True, max_length=128)
            token = pw.BigIntegerField(default=0)
            pid = pw.IntegerField()
            host = pw.TextField()
            acquired_at = pw.DateTimeField()

        class Job(Base):
            """A rollback job (store/jobs.py): what the next worker finishes when one did not."""

            memory = pw.ForeignKeyField(Memory, backref="jobs", on_delete="RESTRICT")
            job = pw.CharField(unique=True, max_length=255)
            kind = pw.CharField(max_length=16)
            edit = pw.ForeignKeyField(Edit, backref="jobs", on_delete="RESTRICT")
            by_edit = pw.ForeignKeyField(Edit, null=True, backref="superseding_jobs", on_delete="RESTRICT")
            reason = pw.TextField(null=True)
            exact = pw.BooleanField(default=False)
            status = pw.CharField(max_length=16, index=True)
            error = pw.TextField(null=True)
            created_at = pw.DateTimeField()
            updated_at = pw.DateTimeField()

        self.db = db
        self.StoreInfo, self.Memory, self.Edit, self.Event = StoreInfo, Memory, Edit, Event
        self.Checkpoint, self.Writer, self.Job = Checkpoint, Writer, Job
        self.all = [StoreInfo, Memory, Edit, Event, Checkpoint, Writer, Job]

    def create(self) -> None:
        """Create missing tables (the event log guarded by triggers against updates and deletes);
        refuse a ledger written by a newer schema.

        Safe when many processes open one ledger at once: a ledger whose schema is complete is
        only read (no DDL, no lock); otherwise the schema is created in one transaction, under a
        PostgreSQL advisory lock (SQLite: the write lock), by the first process to get there."""
        if self._complete():
            return
        with self.db.atomic():
            if isinstance(self.db, pw.PostgresqlDatabase):
                self.db.execute_sql("SELECT pg_advisory_xact_lock(%s::int4, %s::int4)", SCHEMA_LOCK)
            if self._complete():
                return
            self.db.create_tables(self.all, safe=True)
            for statement in self._append_only_triggers():
                self.db.execute_sql(statement)
            if self.StoreInfo.get_or_none(self.StoreInfo.key == "schema_version") is None:
                self.StoreInfo.create(key="schema_version", value=str(SCHEMA_VERSION))

    def _complete(self) -> bool:
        """Every table is there and the schema version (written with the triggers, in the same
        transaction) is this code's; a newer one is refused."""
        if not {m._meta.table_name for m in self.all} <= set(self.db.get_tables()):
            return False
        row = self.StoreInfo.get_or_none(self.StoreInfo.key == "schema_version")
        if row is not None and int(row.value) > SCHEMA_VERSION:
            raise RuntimeError(f"the ledger has schema {row.value}; this code reads up to {SCHEMA_VERSION}")
        return row is not None and int(row.value) == SCHEMA_VERSION

    def _append_only_triggers(self) -> list[str]:
        table = self.Event._meta.table_name
        if isinstance(self.db, pw.SqliteDatabase):
            return [f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END" for op in ("UPDATE", "DELETE")]
        if isinstance(self.db, pw.PostgresqlDatabase):
            return [f"CREATE OR REPLACE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                    f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$",
                    f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"]
        return []
