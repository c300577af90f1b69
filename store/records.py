"""Plain records the store hands out (snapshots of ledger rows), its errors, and the mask codec.

Nothing here imports torch: the ledger CLI reads these without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

QUEUED, APPLYING, APPLIED, FAILED, ROLLED_BACK = "queued", "applying", "applied", "failed", "rolled_back"
STATUSES = (QUEUED, APPLYING, APPLIED, FAILED, ROLLED_BACK)
PENDING = (QUEUED, APPLYING)


class StoreError(RuntimeError):
    """Base class of the store's errors."""


class UnknownMemoryError(StoreError, KeyError):
    """No memory of that name in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownEditError(StoreError, KeyError):
    """No edit with that id in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MemoryExistsError(StoreError):
    """A memory of that name exists already."""


class InvalidRequestError(StoreError, ValueError):
    """A request the ledger cannot record as submitted (wrong types, text that is not UTF-8)."""


class RequestConflictError(StoreError):
    """The request id is recorded already, with a different payload."""


class StatusError(StoreError):
    """The edit is not in a status that allows this change (e.g. rolling back a failed edit)."""


class WriterLockedError(StoreError):
    """Another process holds the writer lock of this memory."""


class FencingError(StoreError):
    """This process no longer holds the writer lock it took: it must stop writing."""


def utcnow() -> datetime:
    """Naive UTC time (both SQLite and PostgreSQL store it as given)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="microseconds") + "Z" if value is not None else None


# -- masks: k sorted column indices of 0..D-1, kept as a D-bit little-endian bitmap ----------------
# At k/D ≈ 0.29 a bitmap (D/8 bytes) is 9× smaller than k int32 indices (4k bytes).


def encode_mask(columns: list[int], size: int) -> bytes:
    bits = bytearray((size + 7) // 8)
    for c in columns:
        if not 0 <= c < size:
            raise ValueError(f"mask column {c} is outside 0..{size - 1}")
        bits[c >> 3] |= 1 << (c & 7)
    return bytes(bits)


def decode_mask(bits: bytes) -> list[int]:
    out: list[int] = []
    for byte_index, byte in enumerate(bits):
        while byte:
            low = byte & -byte
            out.append(byte_index * 8 + low.bit_length() - 1)
            byte ^= low
    return out


def payload_hash(memory: str, prompt: str, target: str, rephrases: list[str], metadata: dict[str, Any]) -> str:
    """What a request id stands for: the same id must always come with the same payload."""
    text = json.dumps({"memory": memory, "prompt": prompt, "target": target, "rephrases": rephrases,
                       "metadata": metadata}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class MemoryRecord:
    """One memory: what it was made on and with, where its fixed tensors are, and its counters."""

    id: int
    name: str
    model_id: str
    revision: str | None
    config: dict[str, Any]
    seed: int
    metadata: dict[str, Any]  # MemoryState.metadata(): config, model identity, prefixes, prompts, BOS
    hidden_size: int
    intermediate_size: int
    layer: int
    top_k: int
    state_file: str
    state_sha256: str
    version: int  # +1 at each change of W_m (applied, rolled back, replayed)
    checkpoint_every: int
    policy: dict[str, Any]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = iso(self.created_at)
        return out


class DeltaRef(NamedTuple):
    """A live edit as loading W_m and the index needs it (Store.applied_refs): no text, no scores."""

    id: int
    delta_file: str | None
    delta_sha256: str | None
    mask_bits: bytes | None
    applied_version: int | None


@dataclass(frozen=True)
class EditRecord:
    """One request and what became of it."""

    id: int
    memory: str
    seq: int
    request_id: str
    prompt: str
    target: str
    rephrases: list[str]
    metadata: dict[str, Any]
    status: str
    reason: str | None
    created_at: datetime
    updated_at: datetime
    applied_at: datetime | None
    rolled_back_at: datetime | None
    mask_bits: bytes | None = field(repr=False)
    mask_size: int | None
    loss: float | None
    losses: list[float] | None
    steps: int | None
    seconds: float | None
    scores: dict[str, float] | None
    unrelated: str | None
    delta_file: str | None
    delta_sha256: str | None
    delta_format: str | None
    delta_bytes: int | None
    applied_version: int | None
    replaces: int | None

    @property
    def mask(self) -> list[int] | None:
        """The edit's k column indices, sorted (None until it has been trained)."""
        return decode_mask(self.mask_bits) if self.mask_bits is not None else None

    def to_dict(self, with_mask: bool = True) -> dict[str, Any]:
        out = asdict(self)
        del out["mask_bits"]
        for key in ("created_at", "updated_at", "applied_at", "rolled_back_at"):
            out[key] = iso(out[key])
        if with_mask:
            out["mask"] = self.mask
        return out


@dataclass(frozen=True)
class EventRecord:
    """One entry of the append-only event log."""

    id: int
    memory: str
    edit_id: int | None
    kind: str
    actor: str
    time: datetime
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["time"] = iso(self.time)
        return out


@dataclass(frozen=True)
class CheckpointRecord:
    """A full copy of W_m (and the index) at a memory version. The deltas it contains are listed
    in its file (`Store.checkpoint_members`), or in `members` for a checkpoint of the old form."""

    id: int
    memory: str
    version: int
    file: str
    sha256: str
    bytes: int
    members: dict[int, str] | None  # old form: edit id -> sha256 of the delta included; None: in the file
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = iso(self.created_at)
        return out


@dataclass
class VerifyReport:
    """What `verify` found: errors break an invariant; warnings do not (e.g. orphan files)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "checked": self.checked}
