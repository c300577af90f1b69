"""`verify`: check a memory's invariants from the ledger and its files alone, with numpy (no torch).

Errors (an invariant is broken):
- a tensor file recorded in the ledger is missing or its sha256 differs;
- an edit's status and fields disagree (applied without mask/delta/event, failed without reason, ...);
- the mask recorded in the ledger differs from the one in its delta file;
- W_m as loading rebuilds it (newest checkpoint − stale deltas + later deltas) differs from the
  sum of the applied edits' deltas (within atol + rtol·max|W|), or a checkpoint's index differs
  from the masks of the edits it holds;
- with `live` (a running memory's state): its W_m or its index (masks with their use counts)
  differ from the ledger's.
Warnings (nothing wrong with the memory): orphan tensor files (a crash between writing a delta
and committing it; the edit is redone), leftover temp files, queued/applying edits to resume.

Delta files are read, hashed and multiplied out a few at a time in reader threads
(`store.parallel.ordered_map`), with BLAS held to one thread meanwhile; what is found is reported
in ledger order, as by one thread.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from safetensors.numpy import load as load_bytes
from threadpoolctl import threadpool_limits

from store import checkpoints as ckpts
from store.files import TMP_SUFFIX, sha256_bytes
from store.parallel import ordered_map
from store.records import APPLIED, FAILED, PENDING, ROLLED_BACK, STATUSES, StoreError, VerifyReport

if TYPE_CHECKING:
    from memoir.state import MemoryState
    from store.store import Store


class _Row(NamedTuple):
    """An edit's ledger row as verify checks it: its status and what it points at, no text or scores
    (a few hundred bytes an edit: at 10 000 edits the rows are not what verify's memory is made of)."""

    id: int
    seq: int
    status: str
    reason: str | None
    mask_bits: bytes | None
    mask_size: int | None
    delta_file: str | None
    delta_sha256: str | None
    applied_at: Any
    applied_version: int | None
    rolled_back_at: Any


def _ledger_rows(store: "Store", memory_id: int) -> list[_Row]:
    """The memory's edits in sequence order, as `_Row`s (one query, rows streamed, no JSON decoded)."""
    Edit = store.t.Edit
    query = (Edit.select(Edit.id, Edit.seq, Edit.status, Edit.reason, Edit.mask, Edit.mask_size, Edit.delta_file,
                         Edit.delta_sha256, Edit.applied_at, Edit.applied_version, Edit.rolled_back_at)
             .where(Edit.memory == memory_id).order_by(Edit.seq).tuples())
    return [_Row(*row[:4], bytes(row[4]) if row[4] is not None else None, *row[5:]) for row in query.iterator()]


class _Files:
    """Reads tensor files, checks their hashes, reports each bad file once. Nothing is cached:
    on a large model the deltas do not fit in memory together, so each is read once where it can be
    (the sum of the applied deltas is taken while their masks are checked), and masks are kept as
    16-byte digests of the ledger's bitmaps, never as lists of columns: memory stays O(d·D + N)."""

    def __init__(self, store: "Store", report: VerifyReport, prefix: str) -> None:
        self.store, self.report, self.prefix = store, report, prefix
        self.bad: set[str] = set()

    def fetch(self, relative: str, sha256: str) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(tensors, None), or (None, what is wrong with the file). Changes nothing: safe in threads."""
        try:
            data = self.store.blobs.get(relative)
        except OSError as exc:
            return None, f"file {relative} is missing ({exc.strerror or exc})"
        if sha256_bytes(data) != sha256:
            return None, f"file {relative} is corrupt (sha256 differs from the ledger)"
        try:
            return load_bytes(data), None
        except Exception as exc:  # noqa: BLE001 - any parse failure is a finding
            return None, f"file {relative} cannot be read as safetensors ({exc})"

    def found(self, relative: str, problem: str | None, what: str) -> None:
        """Report a bad file (once, under the first `what` that needed it)."""
        if problem is not None and relative not in self.bad:
            self.bad.add(relative)
            self.report.errors.append(f"{self.prefix}{what}: {problem}")

    def load(self, relative: str, sha256: str, what: str) -> dict[str, np.ndarray] | None:
        if relative in self.bad:
            return None
        tensors, problem = self.fetch(relative, sha256)
        self.found(relative, problem, what)
        return tensors


def _dense(tensors: dict[str, np.ndarray]) -> np.ndarray:
    if "dense" in tensors:
        return tensors["dense"].astype(np.float32)
    return tensors["g"].astype(np.float32) @ tensors["a"].astype(np.float32).T


def _bitmap(columns: np.ndarray, size: int) -> bytes:
    """k column indices → the ledger's D-bit little-endian bitmap (store.records.encode_mask);
    b"" for columns outside 0..size-1 (they differ from every ledger mask)."""
    columns = np.asarray(columns).astype(np.int64).ravel()
    if columns.size and (columns.min() < 0 or columns.max() >= size):
        return b""
    bits = np.zeros(size, dtype=np.bool_)
    bits[columns] = True
    return np.packbits(bits, bitorder="little").tobytes()


def _key(bitmap: bytes) -> bytes:
    """16 bytes standing for a mask (its bitmap's digest), to count and compare masks in little memory."""
    return hashlib.blake2b(bytes(bitmap), digest_size=16).digest()


def _dense_t(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The delta's transpose (k × d), as cheaply as it comes."""
    if "dense" in tensors:
        return np.asarray(tensors["dense"], dtype=np.float32).T
    return np.asarray(tensors["a"], dtype=np.float32) @ np.asarray(tensors["g"], dtype=np.float32).T


def _close(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[bool, float]:
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return diff <= atol + rtol * scale, diff


def verify(store: "Store", name: str | None = None, live: "MemoryState | None" = None,
           atol: float = 1e-5, rtol: float = 1e-4) -> VerifyReport:
    report = VerifyReport()
    memories = [store.get_memory(name)] if name is not None else store.memories()
    if live is not None and len(memories) != 1:
        raise ValueError("a live state can only be checked against one named memory")
    report.checked = {"memories": len(memories), "edits": 0, "applied": 0, "delta_files": 0, "checkpoints": 0,
                      "max_abs_diff": 0.0}
    # Delta files are checked several at a time (store.parallel); BLAS threads inside each small
    # product would only spin against them (4.5x the CPU time on 2 busy cores, measured).
    with threadpool_limits(limits=1, user_api="blas"):
        for memory in memories:
            _verify_memory(store, memory, live, report, atol, rtol)
    return report


def _verify_memory(store: "Store", memory: Any, live: "MemoryState | None", report: VerifyReport,
                   atol: float, rtol: float) -> None:
    name, prefix = memory.name, f"{memory.name}: "
    files = _Files(store, report, prefix)
    errors, warnings = report.errors, report.warnings
    files.load(memory.state_file, memory.state_sha256, "memory tensors")

    edits = _ledger_rows(store, memory.id)
    events: dict[int | None, list[str]] = defaultdict(list)
    referenced: set[str] = set()
    Event = store.t.Event  # (edit, kind, detail) rows only: no record objects for 3 events an edit
    for edit_id, kind, detail in (Event.select(Event.edit, Event.kind, Event.detail)
                                  .where(Event.memory == memory.id).order_by(Event.id).tuples()):
        events[edit_id].append(kind)
        for key in ("delta_file", "old_delta_file"):
            if (detail or {}).get(key):
                referenced.add(detail[key])
    report.checked["edits"] += len(edits)

    seqs = [e.seq for e in edits]
    if seqs != list(range(1, len(seqs) + 1)):
        errors.append(f"{prefix}sequence numbers are not 1..{len(seqs)} without gaps (rows deleted?)")

    applied: list[_Row] = []
    file_masks: dict[int, bytes] = {}  # edit id -> the key of the mask in its delta file
    shape = (memory.hidden_size, memory.intermediate_size)
    total_t = np.zeros(shape[::-1], dtype=np.float32)  # W_mᵀ: the sum of the applied deltas, from zero
    # (transposed, so that an edit's k columns are k contiguous rows: 4x faster to add than columns)
    size = memory.intermediate_size

    def read(edit: _Row) -> tuple[dict[str, np.ndarray] | None, str | None, bytes, bool, np.ndarray | None]:
        """An edit's delta file checked and multiplied out (in a reader thread): (tensors, problem,
        mask bitmap, whether it has the memory's shapes, Δᵀ when it counts in the sum)."""
        if not (edit.delta_file and edit.delta_sha256):
            return None, None, b"", False, None
        tensors, problem = files.fetch(edit.delta_file, edit.delta_sha256)
        if tensors is None:
            return None, problem, b"", False, None
        fits = _shapes_ok(tensors, memory)
        counted = fits and edit.status == APPLIED
        return tensors, None, _bitmap(tensors["mask"], size), fits, _dense_t(tensors) if counted else None

    for edit, (tensors, problem, bitmap, fits, delta_t) in zip(edits, ordered_map(read, edits)):
        what = f"edit {edit.id} (seq {edit.seq})"
        _check_status(edit, events[edit.id], memory, prefix + what, errors, warnings)
        if edit.status == APPLIED:
            applied.append(edit)
        if edit.delta_file and edit.delta_sha256:
            referenced.add(edit.delta_file)
            files.found(edit.delta_file, problem, what)
            report.checked["delta_files"] += 1
            if tensors is not None:
                file_masks[edit.id] = _key(bitmap)
                if edit.mask_bits is not None and bytes(edit.mask_bits) != bitmap:
                    errors.append(f"{prefix}{what}: the ledger's mask differs from the mask in its delta file")
                if not fits:
                    errors.append(f"{prefix}{what}: its delta file does not have the memory's shapes "
                                  f"(d={memory.hidden_size}, k={memory.top_k})")
                elif delta_t is not None:
                    total_t[tensors["mask"].astype(np.int64)] += delta_t
    applied.sort(key=lambda e: e.applied_version or 0)
    report.checked["applied"] += len(applied)
    if applied and (applied[-1].applied_version or 0) > memory.version:
        errors.append(f"{prefix}an edit's version is above the memory's version {memory.version}")

    # W_m: the sum of the applied deltas (above) vs what loading rebuilds from the newest checkpoint.
    total = total_t.T
    checkpoints = store.checkpoints(name)
    report.checked["checkpoints"] += len(checkpoints)
    tensors, members = None, None
    for ckpt in checkpoints:  # every file's hash; the deltas each holds are not orphans
        referenced.add(ckpt.file)
        tensors, members = files.load(ckpt.file, ckpt.sha256, f"checkpoint v{ckpt.version}"), ckpt.members
        try:
            members = ckpts.held(tensors, ckpt.members) if tensors is not None else members
        except StoreError as exc:
            errors.append(f"{prefix}checkpoint v{ckpt.version}: {exc}")
            tensors = None
        referenced.update(store.delta_key(name, sha) for sha in (members or {}).values())
    rebuilt = None
    if checkpoints and tensors is not None:  # without one, loading sums the deltas from zero: the total
        rebuilt = _rebuild(store, name, files, checkpoints[-1], tensors, members, edits, applied, shape, prefix,
                           errors)
    if rebuilt is not None:
        ok, diff = _close(rebuilt, total, atol, rtol)
        report.checked["max_abs_diff"] = max(report.checked["max_abs_diff"], diff)
        if not ok:
            errors.append(f"{prefix}W_m rebuilt from the newest checkpoint differs from the sum of the "
                          f"{len(applied)} applied deltas (max |difference| {diff:.3g})")

    # The index: the applied edits' masks, each distinct mask with the count of edits using it.
    ledger_masks = {e.id: _key(e.mask_bits) for e in applied if e.mask_bits is not None}
    missing = [e.id for e in applied if e.mask_bits is None]
    if missing:
        errors.append(f"{prefix}applied edits without a mask: {missing}")
    usage = Counter(ledger_masks.values())
    file_usage = Counter(file_masks[e.id] for e in applied if e.id in file_masks)
    if file_usage != usage and len(file_masks) == len(applied):
        errors.append(f"{prefix}mask use counts from the delta files differ from the ledger's")
    if live is not None:
        _check_live(live, total, ledger_masks, usage, prefix, report, atol, rtol)

    _orphans(store, name, referenced, prefix, warnings)


def _check_status(edit: "_Row", kinds: list[str], memory: Any, what: str, errors: list[str],
                  warnings: list[str]) -> None:
    if edit.status not in STATUSES:
        errors.append(f"{what}: unknown status {edit.status!r}")
        return
    if edit.status in PENDING:
        warnings.append(f"{what} is {edit.status}: its worker will resume it")
    if edit.status in (APPLIED, ROLLED_BACK):
        lacking = [f for f in ("mask_bits", "delta_file", "delta_sha256", "applied_at", "applied_version")
                   if getattr(edit, f) is None]
        if lacking:
            errors.append(f"{what} is {edit.status} but has no {', '.join(lacking)}")
        elif edit.mask_size != memory.top_k or _columns(edit.mask_bits) != memory.top_k:
            errors.append(f"{what}: its mask has {_columns(edit.mask_bits)} columns, the memory's k is {memory.top_k}")
        if APPLIED not in kinds:
            errors.append(f"{what} is {edit.status} but the event log has no 'applied' event for it")
    if edit.status == ROLLED_BACK:
        if edit.rolled_back_at is None or ROLLED_BACK not in kinds:
            errors.append(f"{what} is rolled_back without its time or its 'rolled_back' event")
    if edit.status == FAILED and not edit.reason:
        errors.append(f"{what} failed without a reason")


def _columns(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def _shapes_ok(tensors: dict[str, np.ndarray], memory: Any) -> bool:
    """Whether a delta file holds the memory's shapes: Δ (d × k) or factors G (d × r), A (k × r), and
    k columns within 0..D-1."""
    d, k = memory.hidden_size, memory.top_k
    if "dense" in tensors:
        ok = tensors["dense"].shape == (d, k)
    else:
        g, a = tensors.get("g"), tensors.get("a")
        ok = g is not None and a is not None and g.shape[0] == d and a.shape[0] == k and g.shape[1] == a.shape[1]
    mask = tensors["mask"]
    return ok and mask.shape == (k,) and bool(((mask >= 0) & (mask < memory.intermediate_size)).all())


def _rebuild(store: "Store", name: str, files: _Files, newest: Any, tensors: dict[str, np.ndarray],
             members: dict[int, str], edits: list["_Row"], applied: list["_Row"], shape: tuple[int, int],
             prefix: str, errors: list[str]) -> np.ndarray | None:
    """W_m the way `load_state` builds it, in numpy, on the newest checkpoint (its `tensors`,
    holding the deltas `members`)."""
    weight = tensors["weight"].astype(np.float32).copy()
    if weight.shape != shape:
        errors.append(f"{prefix}checkpoint v{newest.version} has W_m of shape {weight.shape}, not {shape}")
        return None
    held_masks = ((_key(row.tobytes()) for row in tensors[ckpts.MASK_BITS]) if ckpts.MASK_BITS in tensors
                  else (_key(_bitmap(m, shape[1])) for m in tensors["masks"]))  # files of the older form
    index = dict(zip(tensors["mask_edit_ids"].tolist(), held_masks))
    if set(index) != set(members):
        errors.append(f"{prefix}checkpoint v{newest.version}: its index holds edits {sorted(index)}, "
                      f"its list of deltas {sorted(members)}")
    by_id = {e.id: e for e in edits}
    wrong = []
    for edit_id, mask in index.items():  # each held mask vs the mask of the delta the checkpoint holds
        sha, edit = members.get(edit_id), by_id.get(edit_id)
        if edit is not None and edit.delta_sha256 == sha and edit.mask_bits is not None:
            held = _key(edit.mask_bits)
        else:  # replayed since: its old delta file has the mask
            delta = files.load(store.delta_key(name, sha), sha,
                               f"delta of edit {edit_id} in checkpoint v{newest.version}") if sha else None
            held = _key(_bitmap(delta["mask"], shape[1])) if delta is not None else mask
        if held != mask:
            wrong.append(edit_id)
    if wrong:
        errors.append(f"{prefix}checkpoint v{newest.version}: the masks of edits {sorted(wrong)} differ from their deltas'")
    subtract, add = ckpts.plan(members, applied)
    for sha in subtract:
        delta = files.load(store.delta_key(name, sha), sha, f"delta {sha[:12]}… held by checkpoint v{newest.version}")
        if delta is None:
            return None
        weight[:, delta["mask"].astype(np.int64)] -= _dense(delta)
    for edit in add:
        delta = files.load(edit.delta_file, edit.delta_sha256, f"edit {edit.id}") if edit.delta_file else None
        if delta is None:
            return None
        weight[:, delta["mask"].astype(np.int64)] += _dense(delta)
    return weight


def _check_live(live: "MemoryState", total: np.ndarray, ledger_masks: dict[int, bytes],
                usage: Counter, prefix: str, report: VerifyReport, atol: float, rtol: float) -> None:
    weight = live.weight.detach().cpu().float().numpy()
    ok, diff = _close(weight, total, atol, rtol)
    report.checked["live_max_abs_diff"] = diff
    if not ok:
        report.errors.append(f"{prefix}the live W_m differs from the sum of the applied deltas (max |difference| {diff:.3g})")
    live_masks = _live_keys(live)
    if set(live_masks) != set(ledger_masks):
        report.errors.append(f"{prefix}the live index holds edits {sorted(live_masks)}, the ledger applied "
                             f"{sorted(ledger_masks)}")
    elif live_masks != ledger_masks or Counter(live_masks.values()) != usage:
        report.errors.append(f"{prefix}the live index's masks (or their use counts) differ from the ledger's")


def _live_keys(live: "MemoryState") -> dict[int, bytes]:
    """{edit id: mask key} of a running memory's index: from its packed words as they are (the same
    bytes as the ledger's bitmaps), or from columns."""
    size = live.model.intermediate_size
    words = getattr(live.masks, "words", None)
    if words is not None:  # memoir.tophash.PackedMasks
        raw = words.numpy().view(np.uint8)[:, : (size + 7) // 8]
        return {int(i): _key(raw[n].tobytes()) for n, i in enumerate(live.masks.ids)}
    return {int(i): _key(_bitmap(m.numpy(), size)) for i, m in live.masks.items()}


def _orphans(store: "Store", name: str, referenced: set[str], prefix: str, warnings: list[str]) -> None:
    for sub in ("deltas", "checkpoints", "memory"):
        for blob in store.blobs.list(f"{name}/{sub}/"):
            relative = blob.key
            if relative.endswith(TMP_SUFFIX):
                warnings.append(f"{prefix}leftover temp file {relative} (an interrupted write)")
            elif sub != "memory" and relative not in referenced:
                warnings.append(f"{prefix}orphan file {relative}: no ledger row uses it "
                                "(a crash between writing it and committing; safe to delete)")
