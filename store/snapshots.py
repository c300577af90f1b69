"""Read-only snapshots of a memory at a ledger sequence number, for serving.

A snapshot "at seq S" is the memory as it stood before the edit with seq S+1 entered the ledger
(its `queued` event), or as it stands now when no later edit has: the edits with seq <= S
applied by then, minus those rolled back by then, with the deltas they held then (a replay
swaps an edit's delta). It is rebuilt from the append-only event log (which delta entered or
left W_m, and when), the newest checkpoint taken before that point and content-addressed delta
files, which are never deleted. Rollbacks and replays committed between S and S+1 belong to S.

`seq` as served is the newest *settled* sequence number (applied, failed or rolled back; not
queued or applying), so "newest" and "at the newest seq" are the same memory. `version` is the
memory's counter of W_m changes; (seq, version) names a snapshot exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import peewee as pw

from store.records import APPLIED, PENDING, QUEUED, ROLLED_BACK, EditRecord, StoreError

if TYPE_CHECKING:
    from memoir.state import MemoryState, ModelIdentity
    from store.store import Store

REPLAYED = "replayed"


@dataclass(frozen=True)
class LiveEdit:
    """An edit a snapshot holds."""

    id: int
    seq: int
    request_id: str
    prompt: str
    target: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """Which memory a state is: its name, newest settled seq, version and live edits (in the order
    their deltas entered W_m)."""

    name: str
    seq: int
    version: int
    edits: tuple[LiveEdit, ...]

    @property
    def mark(self) -> tuple[int, int]:
        return self.seq, self.version

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seq": self.seq, "version": self.version,
                "edits": [e.to_dict() for e in self.edits]}


def _live(edit: EditRecord) -> LiveEdit:
    return LiveEdit(id=edit.id, seq=edit.seq, request_id=edit.request_id, prompt=edit.prompt, target=edit.target)


def ledger_mark(store: "Store", name: str) -> tuple[int, int]:
    """(newest settled seq, version) of memory `name` as it stands: two small queries, for polling."""
    memory = store.get_memory(name)
    Edit = store.t.Edit
    seq = (Edit.select(pw.fn.MAX(Edit.seq))
           .where((Edit.memory == memory.id) & Edit.status.not_in(PENDING)).scalar()) or 0
    return int(seq), int(memory.version)


def load_snapshot(store: "Store", name: str, at_seq: int | None = None,
                  expect: "ModelIdentity | None" = None) -> tuple[Snapshot, "MemoryState"]:
    """The memory as it stands (`at_seq` None) or as it stood at seq `at_seq` (see the module doc).

    Refuses (StoreError) a seq the ledger has not settled yet; with `expect`, a memory made on
    another model (MemoryMismatchError)."""
    if at_seq is None:
        return _current(store, name, expect)
    if isinstance(at_seq, bool) or not isinstance(at_seq, int) or at_seq < 0:
        raise StoreError(f"at_seq must be a whole number >= 0, got {at_seq!r}")
    newest, _ = ledger_mark(store, name)
    if at_seq > newest:
        raise StoreError(f"memory {name!r} has no settled seq {at_seq} yet: the newest is {newest}")
    return _past(store, name, at_seq, expect)


def _current(store: "Store", name: str, expect: "ModelIdentity | None") -> tuple[Snapshot, "MemoryState"]:
    """The store's own loading path, inside one read transaction with the mark and the live edits."""
    with store.snapshot():
        seq, version = ledger_mark(store, name)
        edits = store.applied(name)
        state = store.load_state(name, expect)
    return Snapshot(name, seq, version, tuple(_live(e) for e in edits)), state


def _past(store: "Store", name: str, at_seq: int, expect: "ModelIdentity | None") -> tuple[Snapshot, "MemoryState"]:
    """Replay the event log up to the cut: which delta of which edit was in W_m, at which version;
    then let the store rebuild that W_m (a checkpoint taken by then, minus and plus deltas)."""
    from store import tensors

    with store.snapshot():
        memory = store.get_memory(name)
        rows = {e.id: e for e in store.edits(name)}
        events = store.events(name=name)
    live: dict[int, EditRecord] = {}  # each edit as it was in W_m then, in the order the deltas entered
    version = 0
    for event in events:
        if event.kind == QUEUED and rows[event.edit_id].seq > at_seq:
            break
        changed = event.detail.get("version")
        if event.kind in (APPLIED, REPLAYED):
            live.pop(event.edit_id, None)
            live[event.edit_id] = replace(rows[event.edit_id], delta_sha256=event.detail["delta_sha256"],
                                          delta_file=event.detail["delta_file"])
        elif event.kind == ROLLED_BACK:
            live.pop(event.edit_id, None)
        elif changed is not None and changed > version:
            raise StoreError(f"event {event.id} ({event.kind!r}) changed memory {name!r} in a way "
                             "this reader cannot replay")
        else:
            continue
        version = int(changed)
    edits = list(live.values())
    weight = store.weight_of(name, edits, before_version=version + 1)
    fixed = store.read_tensor(memory.state_file, memory.state_sha256)
    state = tensors.build_state(memory.metadata, fixed, weight, {e.id: e.mask_bits for e in edits}, expect)
    return Snapshot(name, at_seq, version, tuple(_live(e) for e in edits)), state


__all__ = ["LiveEdit", "Snapshot", "ledger_mark", "load_snapshot"]
