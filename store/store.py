"""Store: the ledger of every edit (SQLite or PostgreSQL via peewee) and its tensor files.

Layout of a local store (`MEMOIR_STORE`, default `./memoir-store`, owner-only):

    ledger.db                                  the ledger (SQLite, WAL, foreign keys on)
    locks/<memory>.lock                        writer locks (fcntl.flock)
    tensors/<memory>/memory/<sha>.safetensors  π and μ of the memory
    tensors/<memory>/deltas/<sha>.safetensors  each applied edit's change to W_m (its own columns)
    tensors/<memory>/checkpoints/v<version>-<sha>.safetensors   W_m + index + the delta each edit held,
                                               every N changes; the newest few kept (store/checkpoints.py)

The tensors can live apart from the ledger (`tensor_dir`, `MEMOIR_TENSORS`): another directory,
or S3-compatible object storage (`s3://bucket/prefix`, store/blobs.py). With the ledger on
PostgreSQL and the tensors in object storage, nothing of a memory lives on one host. Keys in
object storage are the relative paths above (`<memory>/deltas/<sha>.safetensors`).

Invariant kept here: W_m = Σ deltas of the `applied` edits (a delta file is written and
fsynced (an object is written and verified) before the ledger row that makes it applied is committed: a crash in between leaves
an orphan file and an edit that is still `applying`, to be redone), and the index holds
exactly their masks. `verify` checks it. Rollback jobs are ledger rows too (store/jobs.py), so
that the next writer finishes one a crash left undone. Every ledger write of a writer is fenced.

Methods taking or returning tensors import torch on first use; the rest does not.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import peewee as pw

from store import checkpoints as ckpts
from store import database
from store import jobs as job_kinds
from store.blobs import Blobs, LocalBlobs, open_blobs, put_content_addressed, read_verified
from store.files import FILE_MODE, private_dir
from store.jobs import JobRecord
from store.lock import WriterLock
from store.models import Tables
from store.parallel import ordered_map
from store.records import (
    APPLIED,
    APPLYING,
    FAILED,
    PENDING,
    QUEUED,
    ROLLED_BACK,
    STATUSES,
    CheckpointRecord,
    DeltaRef,
    EditRecord,
    EventRecord,
    InvalidRequestError,
    MemoryExistsError,
    MemoryRecord,
    RequestConflictError,
    StatusError,
    StoreError,
    UnknownEditError,
    UnknownMemoryError,
    VerifyReport,
    encode_mask,
    payload_hash,
    utcnow,
)

if TYPE_CHECKING:
    import torch

    from memoir.delta import EditDelta
    from memoir.editor import EditResult
    from memoir.state import MemoryState, ModelIdentity

log = logging.getLogger(__name__)

DEFAULT_STORE = "./memoir-store"
LEDGER_FILE = "ledger.db"
DEFAULT_CHECKPOINT_EVERY = 25  # a restart adds at most 24 deltas; a checkpoint at 10 000 edits costs ~0.1 s
MAX_REQUEST_ID = 255
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "synchronous": "full", "busy_timeout": 30_000}


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}[{os.getpid()}]"


def check_name(name: str) -> str:
    """Memory names become directory and queue names: letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StoreError(f"invalid memory name {name!r}: use up to 128 letters, digits, '.', '_' or '-'")
    return name


def _check_text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{field} is not valid UTF-8 text") from exc
    if "\x00" in value:
        raise InvalidRequestError(f"{field} contains a NUL character")
    return value


def _check_json(field: str, value: Any) -> None:
    """Metadata is stored as JSON: plain dicts, lists, strings, numbers, booleans, null."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_text(f"{field} key", key)
            _check_json(f"{field}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for n, item in enumerate(value):
            _check_json(f"{field}[{n}]", item)
    elif isinstance(value, str):
        _check_text(field, value)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise InvalidRequestError(f"{field} is a {type(value).__name__}, not JSON data")


def _statuses(status: str | Sequence[str]) -> list[str]:
    """The statuses asked for, each a known one (StoreError naming the others)."""
    wanted = [status] if isinstance(status, str) else list(status)
    unknown = set(wanted) - set(STATUSES)
    if unknown:
        raise StoreError(f"unknown status {sorted(unknown)}: one of {', '.join(STATUSES)}")
    return wanted


class Store:
    """The ledger and tensor files of one or more memories. Open with `Store.open(...)`."""

    def __init__(self, db: pw.Database, tensors: "Blobs | str | os.PathLike", lock_dir: Path | None,
                 location: str, actor: str | None = None) -> None:
        self.db = db
        self.t = Tables(db)
        self.blobs = open_blobs(tensors)
        # the tensor directory on this host; None when the tensors are in object storage
        self.tensor_dir: Path | None = self.blobs.root if isinstance(self.blobs, LocalBlobs) else None
        self.lock_dir = lock_dir
        self.location = location
        self.actor = actor or default_actor()
        self._locks: dict[str, WriterLock] = {}
        self.t.create()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path_or_url: str | os.PathLike | None = None, tensor_dir: "str | os.PathLike | Blobs | None" = None,
             actor: str | None = None) -> "Store":
        """A store directory (SQLite ledger inside) or a database URL (`postgresql://...`).

        Defaults: `$MEMOIR_STORE`, else `./memoir-store`; tensors in `$MEMOIR_TENSORS`, else
        `<store>/tensors` (a database URL needs a tensor location given explicitly). A tensor
        location is a directory or `s3://bucket/prefix` (store/blobs.py)."""
        target = str(path_or_url or os.environ.get("MEMOIR_STORE") or DEFAULT_STORE)
        tensor_dir = tensor_dir or os.environ.get("MEMOIR_TENSORS") or None
        if "://" in target:
            if tensor_dir is None:
                raise StoreError("a store on a database URL needs a tensor directory (tensor_dir or MEMOIR_TENSORS)")
            db = database.connect_url(target)
            if isinstance(db, pw.SqliteDatabase):
                for key, value in SQLITE_PRAGMAS.items():
                    db.pragma(key, value, permanent=True)
                lock_dir = private_dir(Path(db.database).resolve().parent / "locks")
            else:
                lock_dir = None  # PostgreSQL: advisory locks
            location = re.sub(r"//[^@/]*@", "//***@", target)  # never show a password
        else:
            root = private_dir(target)
            ledger = root / LEDGER_FILE
            if not ledger.exists():
                os.close(os.open(ledger, os.O_WRONLY | os.O_CREAT, FILE_MODE))
            db = database.sqlite(str(ledger), pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE", timeout=30)
            tensor_dir = tensor_dir or root / "tensors"
            lock_dir = root / "locks"
            location = str(root)
        if isinstance(db, database.Reconnecting):
            db.open()  # waits (bounded) for a database that is restarting
        else:
            db.connect(reuse_if_open=True)
        try:
            blobs = open_blobs(tensor_dir)
        except BaseException:
            db.close()
            raise
        return cls(db, blobs, lock_dir, location, actor)

    def close(self) -> None:
        for lock in list(self._locks.values()):
            lock.release()
        self._locks.clear()
        if not self.db.is_closed():
            self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.location!r}, tensors={self.blobs.location!r})"

    # -- writer lock ---------------------------------------------------------------------------
    def writer_lock(self, name: str, wait: float = 0.0) -> WriterLock:
        """Become the one writer of memory `name` (WriterLockedError, naming the holder, if taken).

        While this store holds the lock, every change it commits to that memory is fenced."""
        check_name(name)
        if name in self._locks:
            raise StoreError(f"this store holds the writer lock of {name!r} already")
        lock = WriterLock.acquire(name, self.t, self.lock_dir, wait, on_release=lambda: self._locks.pop(name, None))
        self._locks[name] = lock
        return lock

    def snapshot(self) -> Any:
        """A read transaction: every query inside sees the ledger at one moment, while a writer
        goes on committing (SQLite WAL: a deferred transaction; PostgreSQL: repeatable read)."""
        if isinstance(self.db, pw.SqliteDatabase):
            return self.db.atomic("DEFERRED")
        if isinstance(self.db, pw.PostgresqlDatabase):
            return self.db.atomic("REPEATABLE READ")
        return self.db.atomic()

    def _fence(self, name: str) -> None:
        lock = self._locks.get(name)
        if lock is not None:
            lock.check()

    # -- memories ------------------------------------------------------------------------------
    def create_memory(self, name: str, state: "MemoryState", model_id: str, revision: str | None = None,
                      checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                      policy: dict[str, Any] | None = None) -> MemoryRecord:
        """Record a new, empty memory: its config, model, prefixes, π and μ (in a file)."""
        from store import tensors

        check_name(name)
        if checkpoint_every < 1:
            raise StoreError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if self.t.Memory.get_or_none(self.t.Memory.name == name) is not None:
            raise MemoryExistsError(f"memory {name!r} exists already in {self.location}")
        if not tensors.is_empty(state):
            raise StoreError("a new memory must be empty: its edits enter the store through the ledger")
        data = tensors.state_bytes(state)
        state_file, sha = put_content_addressed(self.blobs, f"{name}/memory", data)
        config = state.config
        with self.db.atomic():
            self._fence(name)
            row = self.t.Memory.create(
                name=name, model_id=str(model_id), revision=revision, config=config.to_dict(), seed=config.seed,
                metadata=state.metadata(), hidden_size=state.model.hidden_size,
                intermediate_size=state.model.intermediate_size, layer=config.layer, top_k=config.top_k,
                state_file=state_file, state_sha256=sha, version=0, checkpoint_every=checkpoint_every,
                policy=policy or {}, created_at=utcnow())
            self._event(row, None, "created", None, {"model_id": str(model_id), "revision": revision,
                                                     "layer": config.layer, "top_k": config.top_k})
        return self._memory_record(row)

    def get_memory(self, name: str) -> MemoryRecord:
        return self._memory_record(self._memory_row(name))

    def has_memory(self, name: str) -> bool:
        return self.t.Memory.get_or_none(self.t.Memory.name == name) is not None

    def memories(self) -> list[MemoryRecord]:
        return [self._memory_record(r) for r in self.t.Memory.select().order_by(self.t.Memory.id)]

    def update_memory(self, name: str, checkpoint_every: int | None = None,
                      policy: dict[str, Any] | None = None) -> MemoryRecord:
        """Change how often checkpoints are taken, or the acceptance policy."""
        row = self._memory_row(name)
        changes: dict[str, Any] = {}
        if checkpoint_every is not None:
            if checkpoint_every < 1:
                raise StoreError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
            changes["checkpoint_every"] = checkpoint_every
        if policy is not None:
            changes["policy"] = policy
        if changes:
            with self.db.atomic():
                self._fence(name)
                self.t.Memory.update(**changes).where(self.t.Memory.id == row.id).execute()
                self._event(row, None, "settings", None, changes)
        return self.get_memory(name)

    # -- requests and their status -------------------------------------------------------------
    def record_request(self, name: str, request_id: str, prompt: str, target: str, rephrases: Sequence[str] = (),
                       metadata: dict[str, Any] | None = None, replaces: int | None = None,
                       actor: str | None = None, supersedes: Sequence[int] | None = None) -> tuple[EditRecord, bool]:
        """Record a request as `queued` with the next sequence number; returns (edit, created).

        `supersedes` (default: [`replaces`]) are the edits this one replaces: a `pending` job to
        roll back each is recorded with it (store/jobs.py), `replaces` (default: the first) links
        them. The request id is the idempotency key: the same id with the same payload returns
        the row already there (created False); with another payload it raises RequestConflictError."""
        for edit_id in [replaces, *(supersedes or ())]:
            if edit_id is not None and (isinstance(edit_id, bool) or not isinstance(edit_id, int) or edit_id < 1):
                raise InvalidRequestError(f"replaces must be a ledger edit id (a positive integer), not {edit_id!r}")
        supersedes = list(supersedes) if supersedes is not None else [replaces] if replaces is not None else []
        replaces = replaces if replaces is not None or not supersedes else supersedes[0]
        _check_text("request_id", request_id)
        if not request_id.strip() or len(request_id) > MAX_REQUEST_ID:
            raise InvalidRequestError(f"request_id must be 1..{MAX_REQUEST_ID} characters")
        _check_text("prompt", prompt)
        _check_text("target", target)
        if isinstance(rephrases, str) or not isinstance(rephrases, (list, tuple)):
            raise InvalidRequestError("rephrases must be a list of strings")
        rephrases = [_check_text(f"rephrases[{n}]", r) for n, r in enumerate(rephrases)]
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise InvalidRequestError("metadata must be a JSON object")
        _check_json("metadata", metadata)
        memory = self._memory_row(name)
        digest = payload_hash(name, prompt, target, rephrases, metadata)
        Edit = self.t.Edit
        for attempt in range(3):
            existing = Edit.get_or_none(Edit.request_id == request_id)
            if existing is not None:
                if existing.payload_sha256 != digest:
                    raise RequestConflictError(
                        f"request id {request_id!r} is recorded already (edit {existing.id}) with a different payload")
                return self._edit_record(existing), False
            try:
                with self.db.atomic():
                    self._fence(name)
                    for edit_id in {replaces, *supersedes} - {None}:
                        self._check_replaces(memory, edit_id)
                    seq = (Edit.select(pw.fn.MAX(Edit.seq)).where(Edit.memory == memory.id).scalar() or 0) + 1
                    now = utcnow()
                    row = Edit.create(memory=memory.id, seq=seq, request_id=request_id, payload_sha256=digest,
                                      prompt=prompt, target=target, rephrases=rephrases, metadata=metadata,
                                      status=QUEUED, created_at=now, updated_at=now, replaces=replaces)
                    self._event(memory, row, QUEUED, actor, {"request_id": request_id, "seq": seq})
                    for old in supersedes:
                        self.t.Job.create(memory=memory.id, job=job_kinds.supersede_job(row.id, old),
                                          kind=job_kinds.SUPERSEDE, edit=old, by_edit=row.id,
                                          reason=f"superseded by edit {row.id}", status=job_kinds.PENDING,
                                          created_at=now, updated_at=now)
                return self._edit_record(row), True
            except pw.IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check_replaces(self, memory: Any, edit_id: Any) -> None:
        if isinstance(edit_id, bool) or not isinstance(edit_id, int) or not 0 < edit_id < 2**63:
            raise InvalidRequestError(f"replaces must be a ledger edit id (a positive integer), got {edit_id!r}")
        row = self.t.Edit.get_or_none(self.t.Edit.id == edit_id)
        if row is None or row.memory_id != memory.id:
            raise InvalidRequestError(f"the edit to replace ({edit_id}) is not an edit of memory {memory.name!r}")

    def mark_applying(self, edit: EditRecord | int, actor: str | None = None) -> EditRecord:
        """queued → applying (an `applying` row being resumed stays `applying`)."""
        return self._set_status(edit, (QUEUED, APPLYING), APPLYING, actor)

    def mark_failed(self, edit: EditRecord | int, reason: str, scores: dict[str, float] | None = None,
                    actor: str | None = None) -> EditRecord:
        """queued/applying → failed, with the reason (and the scores, when a policy refused it)."""
        extra: dict[str, Any] = {"reason": str(reason)}
        if scores is not None:
            extra["scores"] = scores
        return self._set_status(edit, PENDING, FAILED, actor, extra, {"reason": str(reason), "scores": scores})

    def mark_applied(self, edit: EditRecord | int, result: "EditResult", actor: str | None = None) -> EditRecord:
        """applying → applied: the delta file is written and fsynced FIRST, then the row commits."""
        row = self._edit_row(edit)
        self._require(row, (APPLYING,), APPLIED)
        memory = row.memory
        self._check_result(memory, row, result)
        delta_file, sha, size, fmt = self._write_delta(memory.name, row, result.delta)
        return self._commit_applied(row.id, result, delta_file, sha, size, fmt, actor)

    def _write_delta(self, name: str, row: Any, delta: "EditDelta") -> tuple[str, str, int, str]:
        from store import tensors

        data = tensors.delta_bytes(delta, {"memory": name, "edit_id": row.id, "request_id": row.request_id})
        path, sha = put_content_addressed(self.blobs, f"{name}/deltas", data)
        return path, sha, len(data), "factored" if delta.is_factored else "dense"

    def _result_fields(self, memory: Any, result: "EditResult", delta_file: str, sha: str, size: int,
                       fmt: str) -> dict[str, Any]:
        mask = [int(c) for c in result.delta.mask.tolist()]
        return {
            "mask": encode_mask(mask, memory.intermediate_size), "mask_size": len(mask),
            "loss": float(result.final_loss), "losses": [float(x) for x in result.losses],
            "steps": int(result.steps), "seconds": float(result.seconds),
            "scores": {k: float(v) for k, v in result.scores.items()}, "unrelated": result.unrelated,
            "delta_file": delta_file, "delta_sha256": sha, "delta_format": fmt, "delta_bytes": size,
        }

    def _commit_applied(self, edit_id: int, result: "EditResult", delta_file: str, sha: str, size: int,
                        fmt: str, actor: str | None) -> EditRecord:
        with self.db.atomic():
            row = self._edit_row(edit_id)
            memory = row.memory
            self._fence(memory.name)
            self._require(row, (APPLYING,), APPLIED)
            version = self._bump_version(memory)
            now = utcnow()
            fields = self._result_fields(memory, result, delta_file, sha, size, fmt)
            self.t.Edit.update(status=APPLIED, reason=None, applied_at=now, updated_at=now,
                               applied_version=version, **fields).where(self.t.Edit.id == row.id).execute()
            self._event(memory, row, APPLIED, actor, {"delta_sha256": sha, "delta_file": delta_file,
                                                      "version": version, "loss": fields["loss"],
                                                      "steps": fields["steps"], "scores": fields["scores"]})
        return self.edit(edit_id)

    def mark_rolled_back(self, edit: EditRecord | int, reason: str, actor: str | None = None,
                         detail: dict[str, Any] | None = None, job: str | None = None) -> EditRecord:
        """applied → rolled_back. The caller has taken the edit's delta out of W_m already.
        `detail` adds JSON fields to the event (e.g. the rollback job that did it); `job` becomes
        `running` in the same transaction (recorded now if it was not), until `end_job`."""
        with self.db.atomic():
            row = self._edit_row(edit)
            memory = row.memory
            self._fence(memory.name)
            self._require(row, (APPLIED,), ROLLED_BACK)
            version = self._bump_version(memory)
            now = utcnow()
            if job is not None:
                self._start_job(memory, row, job, reason, bool((detail or {}).get("exact")), now)
            self.t.Edit.update(status=ROLLED_BACK, reason=str(reason), rolled_back_at=now, updated_at=now).where(
                self.t.Edit.id == row.id).execute()
            self._event(memory, row, ROLLED_BACK, actor, {**(detail or {}), "reason": str(reason),
                                                          "version": version, "delta_sha256": row.delta_sha256})
        return self.edit(row.id)

    def mark_replayed(self, edit: EditRecord | int, result: "EditResult", reason: str = "replayed",
                      actor: str | None = None, detail: dict[str, Any] | None = None) -> EditRecord:
        """An applied edit re-optimised: its new delta replaces its recorded one (the old file stays).
        `detail` adds JSON fields to the event (e.g. the rollback job that did it)."""
        row = self._edit_row(edit)
        self._require(row, (APPLIED,), "replayed")
        memory = row.memory
        self._check_result(memory, row, result)
        delta_file, sha, size, fmt = self._write_delta(memory.name, row, result.delta)
        with self.db.atomic():
            row = self._edit_row(row.id)
            self._fence(memory.name)
            self._require(row, (APPLIED,), "replayed")
            version = self._bump_version(memory)
            fields = self._result_fields(memory, result, delta_file, sha, size, fmt)
            self.t.Edit.update(applied_version=version, updated_at=utcnow(), **fields).where(
                self.t.Edit.id == row.id).execute()
            self._event(memory, row, "replayed", actor, {
                **(detail or {}), "reason": reason, "version": version, "old_delta_sha256": row.delta_sha256,
                "old_delta_file": row.delta_file, "delta_sha256": sha, "delta_file": delta_file,
                "loss": fields["loss"], "steps": fields["steps"]})
        return self.edit(row.id)

    def _set_status(self, edit: EditRecord | int, allowed: Sequence[str], status: str, actor: str | None,
                    fields: dict[str, Any] | None = None, detail: dict[str, Any] | None = None) -> EditRecord:
        with self.db.atomic():
            row = self._edit_row(edit)
            self._fence(row.memory.name)
            self._require(row, allowed, status)
            self.t.Edit.update(status=status, updated_at=utcnow(), **(fields or {})).where(
                self.t.Edit.id == row.id).execute()
            self._event(row.memory, row, status, actor, detail or {})
        return self.edit(row.id)

    @staticmethod
    def _require(row: Any, allowed: Sequence[str], change: str) -> None:
        if row.status not in allowed:
            raise StatusError(f"edit {row.id} is {row.status}: cannot become {change} (only from {', '.join(allowed)})")

    @staticmethod
    def _check_result(memory: Any, row: Any, result: "EditResult") -> None:
        if result.edit_id != row.id:
            raise StoreError(f"the result is for edit {result.edit_id}, not edit {row.id}")
        if result.delta.mask.numel() != memory.top_k or result.delta.hidden_size != memory.hidden_size:
            raise StoreError(f"the delta does not fit memory {memory.name!r} (k={memory.top_k}, d={memory.hidden_size})")

    def _bump_version(self, memory: Any) -> int:
        Memory = self.t.Memory
        Memory.update(version=Memory.version + 1).where(Memory.id == memory.id).execute()
        return Memory.select(Memory.version).where(Memory.id == memory.id).scalar()

    def _event(self, memory: Any, edit: Any, kind: str, actor: str | None, detail: dict[str, Any]) -> None:
        self.t.Event.create(memory=memory.id, edit=edit.id if edit is not None else None, kind=kind,
                            actor=actor or self.actor, time=utcnow(), detail=detail)

    def log_event(self, name: str, kind: str, edit: EditRecord | int | None = None,
                  detail: dict[str, Any] | None = None, actor: str | None = None) -> None:
        """Append an event of another kind (e.g. a rollback's report) to the log (fenced)."""
        memory = self._memory_row(name)
        row = self._edit_row(edit) if edit is not None else None
        with self.db.atomic():
            self._fence(name)
            self._event(memory, row, kind, actor, detail or {})

    # -- jobs (store/jobs.py) --------------------------------------------------------------------
    def _start_job(self, memory: Any, edit: Any, job: str, reason: str, exact: bool, now: Any) -> None:
        Job = self.t.Job
        found = Job.get_or_none(Job.job == job)
        if found is None:
            Job.create(memory=memory.id, job=job, kind=job_kinds.ROLLBACK, edit=edit.id, reason=str(reason),
                       exact=exact, status=job_kinds.RUNNING, created_at=now, updated_at=now)
        elif found.edit_id != edit.id or found.status != job_kinds.PENDING:
            raise StoreError(f"job {job!r} is {found.status} on edit {found.edit_id}: "
                             f"it cannot roll back edit {edit.id}")
        else:
            Job.update(status=job_kinds.RUNNING, updated_at=now).where(Job.id == found.id).execute()

    def end_job(self, name: str, job: str, status: str, kind: str, edit: EditRecord | int | None,
                detail: dict[str, Any], error: str | None = None, actor: str | None = None) -> None:
        """A job ends `done` or `failed` with its event (`kind`, `detail`), in one fenced transaction.
        A job the ledger has no row for (begun before jobs were recorded) gets its event only."""
        if status not in (job_kinds.DONE, job_kinds.FAILED):
            raise StoreError(f"a job ends done or failed, not {status!r}")
        memory = self._memory_row(name)
        row = self._edit_row(edit) if edit is not None else None
        Job = self.t.Job
        with self.db.atomic():
            self._fence(name)
            self._event(memory, row, kind, actor, detail)
            Job.update(status=status, error=error, updated_at=utcnow()).where(
                (Job.job == job) & (Job.memory == memory.id) & Job.status.in_(job_kinds.UNFINISHED)).execute()

    def job(self, job: str) -> JobRecord | None:
        row = self.t.Job.get_or_none(self.t.Job.job == job)
        return self._job_record(row) if row is not None else None

    def jobs(self, name: str, status: str | Sequence[str] | None = None, by: int | None = None) -> list[JobRecord]:
        """The memory's jobs in the order they were recorded; `by`: those of one superseding edit."""
        Job = self.t.Job
        query = Job.select(Job, self.t.Memory).join(self.t.Memory).where(Job.memory == self._memory_row(name).id)
        if status is not None:
            query = query.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
        if by is not None:
            query = query.where(Job.by_edit == by)
        return [self._job_record(r) for r in query.order_by(Job.id)]

    @staticmethod
    def _job_record(r: Any) -> JobRecord:
        return JobRecord(id=r.id, memory=r.memory.name, job=r.job, kind=r.kind, edit_id=r.edit_id,
                         by_edit_id=r.by_edit_id, reason=r.reason, exact=bool(r.exact), status=r.status,
                         error=r.error, created_at=r.created_at, updated_at=r.updated_at)

    # -- reading -------------------------------------------------------------------------------
    def edit(self, edit_id: int) -> EditRecord:
        return self._edit_record(self._edit_row(edit_id))

    def edit_by_request(self, request_id: str) -> EditRecord | None:
        row = self.t.Edit.get_or_none(self.t.Edit.request_id == request_id)
        return self._edit_record(row) if row is not None else None

    def edits(self, name: str | None = None, status: str | Sequence[str] | None = None,
              limit: int | None = None) -> list[EditRecord]:
        """Edits in sequence order (of memory `name`, or all); `limit` keeps the newest ones."""
        Edit = self.t.Edit
        query = Edit.select(Edit, self.t.Memory).join(self.t.Memory)
        if name is not None:
            query = query.where(Edit.memory == self._memory_row(name).id)
        if status is not None:
            query = query.where(Edit.status.in_(_statuses(status)))
        if limit is not None:
            query = query.order_by(Edit.id.desc()).limit(limit)
            return [self._edit_record(r) for r in reversed(list(query))]
        return [self._edit_record(r) for r in query.order_by(Edit.memory, Edit.seq)]

    def edits_after(self, name: str, after_seq: int = 0, limit: int = 100,
                    status: str | Sequence[str] | None = None) -> list[EditRecord]:
        """One page of memory `name`'s edits: those with a sequence number above `after_seq`, in
        sequence order, at most `limit` of them (the next page starts after the last one's seq)."""
        Edit = self.t.Edit
        query = (Edit.select(Edit, self.t.Memory).join(self.t.Memory)
                 .where((Edit.memory == self._memory_row(name).id) & (Edit.seq > after_seq)))
        if status is not None:
            query = query.where(Edit.status.in_(_statuses(status)))
        return [self._edit_record(r) for r in query.order_by(Edit.seq).limit(limit)]

    def pending(self, name: str) -> list[EditRecord]:
        """queued/applying rows of a memory, in sequence order: what a restarted worker resumes."""
        return self.edits(name, status=PENDING)

    def applied(self, name: str) -> list[EditRecord]:
        """The live edits, in the order their current deltas entered W_m."""
        return sorted(self.edits(name, status=APPLIED), key=lambda e: e.applied_version)

    def applied_refs(self, name: str) -> list[DeltaRef]:
        """The live edits as loading needs them (id, delta file and hash, mask bitmap), in applied
        order: one query of five columns, its rows straight from the driver's cursor (no peewee row
        processing: a third of the time at 10 000 edits), no JSON fields decoded."""
        Edit = self.t.Edit
        query = (Edit.select(Edit.id, Edit.delta_file, Edit.delta_sha256, Edit.mask, Edit.applied_version)
                 .where((Edit.memory == self._memory_row(name).id) & (Edit.status == APPLIED))
                 .order_by(Edit.applied_version))
        return [DeltaRef(i, file, sha, bytes(mask) if mask is not None else None, version)
                for i, file, sha, mask, version in self.db.execute(query).fetchall()]

    def applied_masks(self, name: str) -> dict[int, bytes]:
        """The live edits' masks as D-bit bitmaps (edit id -> bytes), in applied order: the index
        without reading the rest of the rows."""
        Edit = self.t.Edit
        rows = (Edit.select(Edit.id, Edit.mask)
                .where((Edit.memory == self._memory_row(name).id) & (Edit.status == APPLIED))
                .order_by(Edit.applied_version).tuples())
        return {edit_id: bytes(mask) for edit_id, mask in rows}

    def events(self, edit: EditRecord | int | None = None, name: str | None = None,
               kinds: Sequence[str] | None = None, after: int | None = None) -> list[EventRecord]:
        """Events in log order, of an edit and/or a memory; `kinds` keeps those kinds, `after` the
        events with a greater id (e.g. those of a job that started with a known event)."""
        Event = self.t.Event
        query = Event.select(Event, self.t.Memory).join(self.t.Memory)
        if edit is not None:
            query = query.where(Event.edit == (edit.id if isinstance(edit, EditRecord) else edit))
        if name is not None:
            query = query.where(Event.memory == self._memory_row(name).id)
        if kinds is not None:
            query = query.where(Event.kind.in_(list(kinds)))
        if after is not None:
            query = query.where(Event.id > after)
        return [EventRecord(id=r.id, memory=r.memory.name, edit_id=r.edit_id, kind=r.kind, actor=r.actor,
                            time=r.time, detail=r.detail or {}) for r in query.order_by(Event.id)]

    def checkpoints(self, name: str) -> list[CheckpointRecord]:
        """The memory's checkpoints, oldest first."""
        C = self.t.Checkpoint
        rows = C.select().where(C.memory == self._memory_row(name).id).order_by(C.version, C.id)
        return [CheckpointRecord(id=r.id, memory=name, version=r.version, file=r.file, sha256=r.sha256,
                                 bytes=r.bytes, members=ckpts.row_members(r.members), created_at=r.created_at)
                for r in rows]

    def path(self, relative: str) -> Path:
        """Absolute path of a tensor file recorded in the ledger (a store whose tensors are in a
        directory; object storage has no path: use `read_tensor`)."""
        path = self.blobs.local_path(relative)
        if path is None:
            raise StoreError(f"the tensors of {self.location} are in {self.blobs.location}, not in a directory")
        return path

    def delta_key(self, name: str, sha256: str) -> str:
        """The key of the delta file with this hash (deltas are content-addressed)."""
        return f"{name}/deltas/{sha256}.safetensors"

    def delta_path(self, name: str, sha256: str) -> Path:
        return self.path(self.delta_key(name, sha256))

    def read_tensor(self, key: str, sha256: str) -> bytes:
        """A tensor file recorded in the ledger, checked against its recorded sha256
        (CorruptFileError when missing, unreadable or different)."""
        return read_verified(self.blobs, key, sha256)

    def write_tensor(self, folder: str, data: bytes, prefix: str = "") -> tuple[str, str]:
        """Store `data` content-addressed under `folder` (complete and verified on return);
        returns (key, sha256) for the ledger row to name."""
        return put_content_addressed(self.blobs, folder, data, prefix)

    # -- tensors -------------------------------------------------------------------------------
    def load_delta(self, edit: EditRecord | int) -> "EditDelta":
        """An edit's recorded change to W_m (hash checked)."""
        from store import tensors

        record = edit if isinstance(edit, EditRecord) else self.edit(edit)
        if record.delta_file is None or record.delta_sha256 is None:
            raise StoreError(f"edit {record.id} ({record.status}) has no delta")
        return tensors.delta_from_bytes(self.read_tensor(record.delta_file, record.delta_sha256))

    def checkpoint_members(self, checkpoint: CheckpointRecord, loaded: dict[str, Any] | None = None) -> dict[int, str]:
        """{edit id: delta sha256} of the edits a checkpoint holds (from its file, or from its row
        for a checkpoint of the old form); `loaded`: its file's tensors, when read already."""
        if loaded is None and checkpoint.members is None:
            from safetensors.numpy import load as load_arrays

            loaded = load_arrays(self.read_tensor(checkpoint.file, checkpoint.sha256))
        return ckpts.held(loaded or {}, checkpoint.members)

    def base_checkpoint(self, name: str, before_version: int | None = None
                        ) -> tuple[CheckpointRecord | None, dict[str, "torch.Tensor"] | None]:
        """The newest checkpoint taken before memory version `before_version` (None: the newest;
        0: none) and its file's tensors (hash checked). One whose file is gone (pruned while this
        reader planned on it) is passed over for the one before it, or none: zeros."""
        from store import tensors

        for checkpoint in reversed(self.checkpoints(name)):
            if before_version is not None and checkpoint.version >= before_version:
                continue
            try:
                data = self.read_tensor(checkpoint.file, checkpoint.sha256)
            except tensors.CorruptFileError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError):
                    raise
                log.warning("checkpoint v%d of %r is gone (pruned?): loading from an older one",
                            checkpoint.version, name)
                continue
            return checkpoint, tensors.load_checkpoint(data)
        return None, None

    def load_plan(self, name: str, edits: Sequence[EditRecord] | None = None,
                  before_version: int | None = None) -> tuple[CheckpointRecord | None, list[str], list[EditRecord]]:
        """How a W_m holding exactly `edits` (default: the applied ones) is rebuilt: the checkpoint
        `base_checkpoint` gives, the delta hashes to subtract from it (edits it holds that are not
        wanted, or held with another delta), and the edits whose deltas to add, in the order given."""
        checkpoint, loaded = self.base_checkpoint(name, before_version)
        edits = self.applied(name) if edits is None else edits
        return (checkpoint, *ckpts.plan(self.checkpoint_members(checkpoint, loaded) if checkpoint else {}, edits))

    def weight_of(self, name: str, edits: Sequence[EditRecord | DeltaRef], before_version: int | None = None,
                  device: Any = None) -> "torch.Tensor":
        """W_m holding exactly `edits` (their recorded deltas, added in the order given), built on the
        newest checkpoint taken before memory version `before_version` (None: the newest; 0: none,
        from zeros), on `device` (default the CPU). Rollback and replay rebuild a past memory with it."""
        import torch

        from store import tensors

        memory = self.get_memory(name)
        checkpoint, loaded = self.base_checkpoint(name, before_version)
        subtract, add = ckpts.plan(self.checkpoint_members(checkpoint, loaded) if checkpoint else {}, edits)
        device = torch.device(device if device is not None else "cpu")

        def read(file_and_sha: tuple[str, str]) -> "EditDelta":  # in reader threads: read, hash, multiply out
            return tensors.delta_for(self.read_tensor(*file_and_sha), device)

        return tensors.rebuild_weight(
            (memory.hidden_size, memory.intermediate_size), loaded,
            ordered_map(read, [(self.delta_key(name, sha), sha) for sha in subtract]),
            ordered_map(read, [(e.delta_file, e.delta_sha256) for e in add]), device)

    def load_state(self, name: str, expect: "ModelIdentity | None" = None, device: Any = None) -> "MemoryState":
        """The memory as it stands: newest checkpoint + later deltas (added on `device`, default the
        CPU: a worker passes its own); masks of the applied edits keyed by edit id. With `expect`,
        refuses (MemoryMismatchError) a memory made on another model."""
        from store import tensors

        with self.snapshot():
            memory = self.get_memory(name)
            applied = self.applied_refs(name)
            weight = self.weight_of(name, applied, device=device)
        fixed = self.read_tensor(memory.state_file, memory.state_sha256)
        return tensors.build_state(memory.metadata, fixed, weight, {e.id: e.mask_bits for e in applied}, expect)

    def checkpoint_due(self, name: str) -> bool:
        """Whether `checkpoint_every` changes of W_m have been made since the newest checkpoint:
        two small queries, whatever the history (run after every edit)."""
        memory = self._memory_row(name)
        C = self.t.Checkpoint
        last = C.select(pw.fn.MAX(C.version)).where(C.memory == memory.id).scalar() or 0
        return memory.version - last >= memory.checkpoint_every

    def checkpoint(self, name: str, weight: "torch.Tensor") -> CheckpointRecord:
        """Save W_m as it stands now (the caller's live memory) with the index of the applied edits
        and the delta each holds (in the file: the ledger row records the version)."""
        from store import tensors

        memory = self.get_memory(name)
        if tuple(weight.shape) != (memory.hidden_size, memory.intermediate_size):
            raise StoreError(f"W_m has shape {tuple(weight.shape)}; memory {name!r} has "
                             f"{(memory.hidden_size, memory.intermediate_size)}")
        Edit = self.t.Edit
        held = [(i, bytes(mask), sha) for i, mask, sha in Edit.select(Edit.id, Edit.mask, Edit.delta_sha256).where(
            (Edit.memory == memory.id) & (Edit.status == APPLIED)).tuples()]
        data = tensors.checkpoint_bytes(weight, held, memory.intermediate_size, memory.top_k, memory.version)
        path, sha = put_content_addressed(self.blobs, f"{name}/checkpoints", data,
                                            prefix=f"v{memory.version:08d}-")
        with self.db.atomic():
            row = self._memory_row(name)
            self._fence(name)
            if row.version != memory.version:
                raise StoreError(f"memory {name!r} changed while its checkpoint was written; take it again")
            self.t.Checkpoint.create(memory=row.id, version=memory.version, file=path, sha256=sha,
                                     bytes=len(data), members={}, created_at=utcnow())
            self._event(row, None, "checkpoint", None, {"version": memory.version, "file": path,
                                                        "sha256": sha, "edits": len(held)})
        return self.checkpoints(name)[-1]

    def prune_checkpoints(self, name: str, keep: int = ckpts.DEFAULT_KEEP) -> list[CheckpointRecord]:
        """Remove all but the newest `keep` (>= 1) checkpoints of a memory: the rows (fenced, with a
        `checkpoints_pruned` event), then their files. Returns those removed. Nothing a past memory
        needs is lost: deltas are never deleted (store/checkpoints.py)."""
        keep = ckpts.check_keep(keep)
        with self.db.atomic():
            self._fence(name)
            memory, checkpoints = self._memory_row(name), self.checkpoints(name)
            removed, kept = checkpoints[:-keep], checkpoints[-keep:]
            if removed:
                self.t.Checkpoint.delete().where(self.t.Checkpoint.id.in_([c.id for c in removed])).execute()
                self._event(memory, None, "checkpoints_pruned", None, {
                    "removed": [c.version for c in removed], "kept": [c.version for c in kept]})
        for file in {c.file for c in removed} - {c.file for c in kept}:
            self.blobs.delete(file)
        return removed

    def verify(self, name: str | None = None, live: "MemoryState | None" = None,
               atol: float = 1e-5, rtol: float = 1e-4) -> VerifyReport:
        """Check the invariants of one memory (or all): see `store.verify`."""
        from store.verify import verify

        with self.snapshot():
            return verify(self, name, live, atol=atol, rtol=rtol)

    # -- rows <-> records ------------------------------------------------------------------------
    def _memory_row(self, name: str) -> Any:
        row = self.t.Memory.get_or_none(self.t.Memory.name == name)
        if row is None:
            raise UnknownMemoryError(f"no memory named {name!r} in {self.location}")
        return row

    def _edit_row(self, edit: EditRecord | int) -> Any:
        edit_id = edit.id if isinstance(edit, EditRecord) else edit
        try:
            edit_id = int(edit_id)
        except (TypeError, ValueError):
            raise UnknownEditError(f"no edit with id {edit_id!r}") from None
        row = self.t.Edit.get_or_none(self.t.Edit.id == edit_id)
        if row is None:
            raise UnknownEditError(f"no edit with id {edit_id} in {self.location}")
        return row

    @staticmethod
    def _memory_record(r: Any) -> MemoryRecord:
        return MemoryRecord(
            id=r.id, name=r.name, model_id=r.model_id, revision=r.revision, config=r.config, seed=r.seed,
            metadata=r.metadata, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size, layer=r.layer,
            top_k=r.top_k, state_file=r.state_file, state_sha256=r.state_sha256, version=r.version,
            checkpoint_every=r.checkpoint_every, policy=r.policy or {}, created_at=r.created_at)

    @staticmethod
    def _edit_record(r: Any) -> EditRecord:
        return EditRecord(
            id=r.id, memory=r.memory.name, seq=r.seq, request_id=r.request_id, prompt=r.prompt, target=r.target,
            rephrases=list(r.rephrases or []), metadata=dict(r.metadata or {}), status=r.status, reason=r.reason,
            created_at=r.created_at, updated_at=r.updated_at, applied_at=r.applied_at,
            rolled_back_at=r.rolled_back_at, mask_bits=bytes(r.mask) if r.mask is not None else None,
            mask_size=r.mask_size, loss=r.loss, losses=r.losses, steps=r.steps, seconds=r.seconds, scores=r.scores,
            unrelated=r.unrelated, delta_file=r.delta_file, delta_sha256=r.delta_sha256,
            delta_format=r.delta_format, delta_bytes=r.delta_bytes, applied_version=r.applied_version,
            replaces=r.replaces_id)

