"""Checkpoints of W_m: which edits one holds, how loading builds on it, and which ones to keep.

A checkpoint row records its memory version, its file and the file's hash; the file holds W_m,
the index of the edits it contains (their masks as the ledger's bitmaps, D/8 bytes each) and,
aligned with the index's edit ids, the sha256 of the delta each one held then (`member_sha256`,
32 bytes a row). The ledger's work per edit is then
the same whatever the history: deciding whether a checkpoint is due reads one number. Rows of
the old form (before this file existed) list {edit id: delta sha256} in their `members` column
and files without `member_sha256`: they are read as they are.

Pruning keeps the newest `keep` checkpoints of a memory. It never loses a memory: delta files
are never deleted, so a memory as it stood at any seq (store.snapshots) can be rebuilt from an
older checkpoint or from zeros; pruning only makes such a rebuild read more deltas. A reader that
planned on a checkpoint pruned meanwhile finds its file gone and falls back on an older one
(`Store.base_checkpoint`). The rows go first, in a fenced transaction, then the files: a crash in
between leaves orphan files that `verify` reports and `memoir store compact` removes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from store.records import EditRecord, StoreError

MEMBERS = "member_sha256"
MASK_BITS = "mask_bits"  # the held edits' masks, the ledger's D-bit bitmaps (older files: `masks`, k columns)
DEFAULT_KEEP = 3  # checkpoints kept per memory (`--keep-checkpoints`)


def held(tensors: Mapping[str, Any], row_members: dict[int, str] | None) -> dict[int, str]:
    """{edit id: delta sha256} a checkpoint holds: from its ledger row (old form) or its file's
    tensors (numpy or torch: `mask_edit_ids` and `member_sha256`)."""
    if row_members is not None:
        return row_members
    ids = [int(i) for i in tensors["mask_edit_ids"].tolist()]
    if MEMBERS not in tensors:
        if ids:
            raise StoreError("a checkpoint lists its edits neither in its ledger row nor in its file")
        return {}
    rows = tensors[MEMBERS]
    if tuple(rows.shape) != (len(ids), 32):
        raise StoreError(f"a checkpoint file's {MEMBERS} does not match its index")
    raw = (rows.numpy() if hasattr(rows, "numpy") else rows).tobytes()  # torch or numpy: one copy, no lists
    return {i: raw[32 * n : 32 * n + 32].hex() for n, i in enumerate(ids)}


def row_members(stored: Any) -> dict[int, str] | None:
    """A checkpoint row's `members` as the record has it: None when its file lists them."""
    return {int(k): v for k, v in stored.items()} if stored else None


def plan(members: dict[int, str], edits: Sequence[EditRecord]) -> tuple[list[str], list[EditRecord]]:
    """How a W_m holding exactly `edits` is rebuilt on a checkpoint holding `members`: the delta
    hashes to subtract (held but not wanted, or held with another delta) and the edits whose
    deltas to add, in the order given."""
    wanted = {e.id: e.delta_sha256 for e in edits}
    subtract = [sha for edit_id, sha in sorted(members.items()) if wanted.get(edit_id) != sha]
    add = [e for e in edits if members.get(e.id) != e.delta_sha256]
    return subtract, add


def check_keep(keep: Any) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"the number of checkpoints to keep must be a whole number >= 1, got {keep!r}")
    return keep


__all__ = ["DEFAULT_KEEP", "MASK_BITS", "MEMBERS", "check_keep", "held", "plan", "row_members"]
