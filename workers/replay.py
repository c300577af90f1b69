"""Replay (`replay`): rebuild W_m and the index from the ledger — re-training the live edits in
sequence order (mode "retrain") or summing their recorded deltas (mode "sum") — and compare it
with the stored memory. It changes nothing. Deterministic on CPU. A replay is a job that may run
in chunks of at most `budget` seconds (the progress is saved in the ledger, a
`replay_progress` event per chunk, `replay_checked` at the end); `replay_message` handles the
worker's `memoir.replay` messages.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memoir import Editor
from pipeline.schema import REPLAY_MODES, RequestError, check_request_id
from store import Store
from workers.rollback import RollbackError, _out_of_time, _task_outcome, first_applied_version

if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)

MODES = REPLAY_MODES


@dataclass
class ReplayReport:
    """A rebuild of W_m and the index from the ledger, compared with the stored memory."""

    name: str
    mode: str
    from_seq: int
    edits: int  # live edits in the rebuilt memory
    rebuilt: list[int]  # the edits re-trained (retrain) or re-added (sum) from `from_seq` on
    at_version: int  # the stored memory's version it was compared with
    max_abs_diff: float
    identical: bool  # bitwise equal to the stored W_m
    masks_ok: bool
    ok: bool  # within the ledger's tolerance, and the same index
    diverged: list[int]  # re-trained to another delta than recorded (their history has rollbacks/replays)
    mask_mismatches: list[int]
    sha256: str  # of the rebuilt W_m's bytes: replays that agree give the same
    seconds: float
    job: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _ReplayState:
    """A replay under way: what it rebuilds, how far it got (a chunk boundary), W_m so far."""

    job: str
    mode: str
    from_seq: int
    edits: list[int]  # every live edit at the start (applied order)
    rebuilt: list[int]  # those to rebuild, in sequence order
    cursor: int
    weight: torch.Tensor
    diverged: list[int] = field(default_factory=list)
    mask_mismatches: list[int] = field(default_factory=list)
    seconds: float = 0.0


REPLAY_PROGRESS, REPLAY_DONE = "replay_progress", "replay_checked"


def _sha(weight: torch.Tensor) -> str:
    return hashlib.sha256(weight.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff <= atol + rtol * (float(b.abs().max()) if b.numel() else 0.0), diff


def _check_replay_args(from_seq: Any, mode: Any, editor: Editor | None) -> None:
    if mode not in MODES:
        raise RollbackError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
        raise RollbackError(f"the sequence number to replay from must be >= 1, got {from_seq!r}")
    if mode == "retrain" and editor is None:
        raise RollbackError("a retrain replay needs the model (an editor)")


def _start_replay(store: Store, name: str, from_seq: int, mode: str, job: str) -> _ReplayState:
    """The live edits now; the earlier ones summed from their recorded deltas (on the newest
    checkpoint taken before the first edit to rebuild, or from zeros when there are none)."""
    from store.snapshots import load_snapshot

    snapshot, _ = load_snapshot(store, name)
    live = [store.edit(e.id) for e in snapshot.edits]
    earlier = [e for e in live if e.seq < from_seq]
    later = sorted((e for e in live if e.seq >= from_seq), key=lambda e: e.seq)
    if not earlier:
        before: int | None = 0
    else:
        before = first_applied_version(store, later[0]) if later else None
    weight = store.weight_of(name, earlier, before_version=before)
    return _ReplayState(job, mode, from_seq, [e.id for e in live], [e.id for e in later], 0, weight)


def _resume_replay(store: Store, name: str, job: str) -> _ReplayState | None:
    """The state saved at the end of the job's last chunk, or None when it has not started."""
    from safetensors.torch import load as load_bytes

    found = [e for e in store.events(name=name, kinds=[REPLAY_PROGRESS]) if e.detail.get("job") == job]
    if not found:
        return None
    d = found[-1].detail
    weight = load_bytes(store.read_tensor(d["file"], d["sha256"]))["weight"]
    return _ReplayState(job, d["mode"], d["from_seq"], d["edits"], d["rebuilt"], d["cursor"], weight,
                        d["diverged"], d["mask_mismatches"], d["seconds"])


def _save_replay(store: Store, name: str, state: _ReplayState) -> None:
    """A chunk boundary: W_m so far in a scratch file, the cursor in a `replay_progress` event."""
    from safetensors.torch import save as save_bytes

    data = save_bytes({"weight": state.weight.detach().cpu().contiguous()})
    # The file's name is this worker's own (never the job's, which a message names): a fresh id
    # and the content's hash; the ledger's progress event is what leads to it.
    path, sha = store.write_tensor(f"{name}/jobs", data, prefix=f"replay-{uuid.uuid4().hex}-")
    detail = {k: v for k, v in asdict(state).items() if k != "weight"}
    store.log_event(name, REPLAY_PROGRESS, None, {**detail, "file": path, "sha256": sha})


def _drop_scratch(store: Store, name: str, job: str) -> None:
    """Delete the scratch files of a finished job: those its progress events recorded."""
    for event in store.events(name=name, kinds=[REPLAY_PROGRESS]):
        if event.detail.get("job") == job and isinstance(event.detail.get("file"), str):
            store.blobs.delete(event.detail["file"])


def replay(store: Store, name: str, from_seq: int = 1, mode: str = "retrain", editor: Editor | None = None,
           *, job: str | None = None, budget: float | None = None, atol: float = 1e-5,
           rtol: float = 1e-4) -> tuple[ReplayReport | None, torch.Tensor | None]:
    """Rebuild W_m from the ledger and compare it with the stored memory; changes no memory.

    The live edits with seq < `from_seq` come from their recorded deltas; those from `from_seq`
    on are, in sequence order, re-trained from their records on the memory rebuilt so far (mode
    "retrain": same masks, same unrelated samples; needs `editor`, whose W_m is the workspace
    and is restored afterwards) or added from their recorded deltas (mode "sum").

    Returns the report and the rebuilt W_m (CPU). With `budget` (seconds) it may stop early
    and return (None, None): the progress is saved in the ledger and the same call with the
    same `job` goes on from there. A finished replay is logged as a `replay_checked` event."""
    _check_replay_args(from_seq, mode, editor)
    job = job or f"replay-{uuid.uuid4().hex}"
    started = time.perf_counter()
    state = _resume_replay(store, name, job) or _start_replay(store, name, from_seq, mode, job)
    pending = [store.edit(i) for i in state.rebuilt[state.cursor :]]
    count = 0
    if state.mode == "sum":
        for edit in pending:
            store.load_delta(edit).apply_to(state.weight, 1.0)
        count = len(pending)
    elif pending:
        memory = editor.memory
        saved = memory.weight.clone()
        try:
            memory.weight.copy_(state.weight)
            for edit in pending:
                if _out_of_time(started, budget, count):
                    break
                result = editor.train(edit.prompt, edit.target, edit.id, unrelated=edit.unrelated)
                if edit.mask is not None and result.mask.tolist() != edit.mask:
                    state.mask_mismatches.append(edit.id)
                result.delta.apply_to(memory.weight, 1.0)
                if not torch.equal(result.delta.dense(), store.load_delta(edit).dense()):
                    state.diverged.append(edit.id)
                count += 1
            state.weight = memory.weight.detach().cpu().clone()
        finally:
            memory.weight.copy_(saved)
            memory.last = None
    state.cursor += count
    state.seconds += time.perf_counter() - started
    if state.cursor < len(state.rebuilt):
        _save_replay(store, name, state)
        return None, None
    version, stored = _stored_weight(store, name)
    ok_weight, diff = _close(state.weight, stored, atol, rtol)
    report = ReplayReport(
        name=name, mode=state.mode, from_seq=state.from_seq, edits=len(state.edits), rebuilt=state.rebuilt,
        at_version=version, max_abs_diff=diff, identical=bool(torch.equal(state.weight, stored)),
        masks_ok=not state.mask_mismatches, ok=ok_weight and not state.mask_mismatches, diverged=state.diverged,
        mask_mismatches=state.mask_mismatches, sha256=_sha(state.weight), seconds=state.seconds, job=job)
    store.log_event(name, REPLAY_DONE, None, report.to_dict())
    _drop_scratch(store, name, job)
    return report, state.weight


def _stored_weight(store: Store, name: str) -> tuple[int, torch.Tensor]:
    from store.snapshots import load_snapshot

    snapshot, state = load_snapshot(store, name)
    return snapshot.version, state.weight


def replay_message(runtime: "Runtime", task_id: str, message: Any,
                   budget: float | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Handle one `memoir.replay` message: {request_id, name, from_seq?, mode?} starts a replay
    checked against the stored memory and this worker's live one; {job, ...} continues one."""
    if not isinstance(message, dict):
        return _task_outcome(task_id, "replay", "failed",
                             reason=f"the message is not a JSON object but {type(message).__name__}"), None
    job = message.get("job", task_id)
    try:
        check_request_id(job, "job")  # a job is named by its first request's id
    except RequestError as exc:
        return _task_outcome(task_id, "replay", "failed", reason=str(exc)), None
    try:
        if message.get("name", runtime.name) != runtime.name:
            raise RollbackError(f"the request is for memory {message.get('name')!r}; this worker serves {runtime.name!r}")
        from_seq, mode = message.get("from_seq", 1), message.get("mode", "retrain")
        report, weight = replay(runtime.store, runtime.name, from_seq, mode, runtime.editor, job=job, budget=budget)
    except Exception as exc:  # noqa: BLE001 - a replay changes no memory; report and go on
        log.warning("replay %s failed: %s", job, exc)
        return _task_outcome(job, "replay", "failed", reason=f"{type(exc).__name__}: {exc}"), None
    if report is None:
        return _task_outcome(job, "replay", "running"), {
            "request_id": f"{job}.{uuid.uuid4().hex[:8]}", "job": job, "name": runtime.name,
            "from_seq": from_seq, "mode": mode}
    live_ok, live_diff = _close(weight, runtime.editor.memory.weight.detach().cpu(), 1e-5, 1e-4)
    fields = {k: v for k, v in report.to_dict().items() if k != "job"}  # the outcome's own `request_id` is the job
    return _task_outcome(job, "replay", "done", **fields, live_max_abs_diff=live_diff, live_ok=live_ok), None


__all__ = ["MODES", "REPLAY_DONE", "REPLAY_PROGRESS", "ReplayReport", "replay", "replay_message"]
