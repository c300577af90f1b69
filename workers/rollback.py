"""Rollback of edits on a Runtime (one model, its MEMOIR memory, the store).

W_m is the sum of the live (`applied`) edits' recorded deltas, each on its own columns, so an
edit can be taken out exactly.

Rollback of edit E (the default, "fast"):
1. The live edits whose masks share a column with E's are *checked*: each is scored on its own
   prompt (teacher-forced, with retrieval as at inference) with E and, by a trial subtraction,
   without it. The edited layer's inputs for those prompts are captured once per process
   (`ActivationCache`, memory off: nothing upstream of the layer depends on W_m), so scoring
   runs only the layers after it (memoir.fastpath); other architectures score with batched
   full forwards.
2. The ledger first: E becomes `rolled_back` (time, reason, and in its event the job, the
   checked edits and those to replay); then W_m -= E's delta on its columns and E leaves the
   index (Editor.remove: its mask stays while another live edit uses it).
3. The checked edits that got *worse* — they answered their target (every target token right,
   teacher-forced) and no longer do — are replayed: re-optimised on their own mask from the
   memory as it stands, with their recorded unrelated sample (Editor.train), their recorded
   contribution replaced by old + this change (Store.mark_replayed). A replay moves the edits
   sharing its columns too, so the checked edits are scored again after each round of
   replays, and those now worse form the next round (at most MAX_ROUNDS; the report lists any
   left worse). Edits that did not answer their target are not replayed: re-optimising an
   edit that never converged moves its neighbours more than it gains.

Exact rollback (`exact=True`): the memory as if E had never been applied. Start from the newest
checkpoint taken before E was applied (or zeros) plus the recorded deltas of the earlier live
edits, then re-train every later live edit in sequence order from their records (same masks,
same unrelated samples). On CPU this equals, bitwise, a fresh run without E.

Jobs and chunks: a rollback is a job named by its request id. Re-optimising edits is the long
part, so it runs in chunks of at most `budget` seconds; the ledger is the cursor (E's
`rolled_back` event lists the edits to replay, each `replayed`/`replay_failed` event names the
job, a `rollback_progress` event ends each chunk, `rollback_done` ends the job). A chunk that
runs twice (a redelivered message) finds its work done and does nothing again. The job itself is
a ledger row (store/jobs.py), `running` from the commit that rolls its edit back until the one
that writes `rollback_done`: a job a crash or an unwritable store interrupted is finished by the
next worker at start (workers/jobs.py). A replay that fails for its own reasons is recorded
(`replay_failed`) and the job goes on; one the store interrupts (INTERRUPTIONS) stops the job.

Superseding edits are in workers/supersede.py, the activation cache that scores edits in
workers/activations.py, and replay (rebuilding the memory from the ledger) in workers/replay.py.

Event details written here never hold a `version` key (store.snapshots replays versions).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import peewee as pw
import torch

from memoir import EditDelta, EditRefusedError, EditResult, Editor, InvalidEditError
from store import APPLIED, ROLLED_BACK, EditRecord, FencingError, Store, StoreError
from store.jobs import DONE as JOB_DONE
from store.jobs import FAILED as JOB_FAILED
from store.jobs import JOB_FAILED as JOB_FAILED_EVENT
from store.jobs import PENDING as JOB_PENDING
from store.jobs import RUNNING as JOB_RUNNING
from workers.activations import activation_cache

if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)

ROLLBACK_PROGRESS, ROLLBACK_RECHECK, ROLLBACK_DONE = "rollback_progress", "rollback_recheck", "rollback_done"
REPLAY_FAILED = "replay_failed"


class RollbackError(StoreError):
    """A rollback or replay that cannot be done as asked; nothing was changed."""


# -- finding edits ---------------------------------------------------------------------------------


def find_edit(store: Store, ref: int | str) -> EditRecord | None:
    """An edit by ledger id (int, or a string of digits) or by request id (str)."""
    if isinstance(ref, str):
        edit = store.edit_by_request(ref)
        if edit is not None or not ref.isdigit():
            return edit
    try:
        return store.edit(int(ref))
    except (StoreError, KeyError, ValueError, OverflowError):  # OverflowError: beyond SQLite's integers
        return None


def live_edit(store: Store, name: str, ref: int | str) -> EditRecord:
    """The applied edit `ref` of memory `name`; RollbackError (saying why) for anything else."""
    edit = find_edit(store, ref)
    if edit is None:
        what = f"{ref}" if isinstance(ref, int) or str(ref).isdigit() else f"with request id {ref!r}"
        raise RollbackError(f"no edit {what} in {store.location}")
    if edit.memory != name:
        raise RollbackError(f"edit {edit.id} belongs to memory {edit.memory!r}, not {name!r}")
    if edit.status == ROLLED_BACK:
        raise RollbackError(f"edit {edit.id} is already rolled back ({edit.rolled_back_at}: {edit.reason})")
    if edit.status != APPLIED:
        why = f": {edit.reason}" if edit.reason else ""
        raise RollbackError(f"edit {edit.id} is {edit.status}{why}; only an applied edit can be rolled back")
    return edit


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def matching_edits(store: Store, name: str, prompt: str | None = None, subject: str | None = None) -> list[EditRecord]:
    """Live edits whose prompt (or metadata `subject`) equals the text, ignoring case and spacing."""
    if (prompt is None) == (subject is None):
        raise RollbackError("give a prompt or a subject")
    wanted = _normal(prompt if prompt is not None else subject)
    if not wanted:
        raise RollbackError("the prompt or subject to match is empty")
    if prompt is not None:
        return [e for e in store.applied(name) if _normal(e.prompt) == wanted]
    return [e for e in store.applied(name) if isinstance(e.metadata.get("subject"), str)
            and _normal(e.metadata["subject"]) == wanted]


def overlapping(store: Store, name: str, edit: EditRecord) -> list[int]:
    """The other live edits whose masks share at least one column with `edit`'s (sorted ids)."""
    own = int.from_bytes(edit.mask_bits or b"", "little")
    return sorted(i for i, bits in store.applied_masks(name).items()
                  if i != edit.id and int.from_bytes(bits, "little") & own)


# -- re-optimising one edit ------------------------------------------------------------------------


def retrain(editor: Editor, edit: EditRecord) -> EditResult:
    """Optimise `edit` on the memory as it stands, with its recorded unrelated sample.

    Refuses (RollbackError) when its prompt no longer selects its recorded mask (the model or
    the memory's fixed tensors differ from those it was made with)."""
    result = editor.train(edit.prompt, edit.target, edit.id, unrelated=edit.unrelated)
    if edit.mask is not None and result.mask.tolist() != edit.mask:
        raise RollbackError(f"edit {edit.id}: its prompt now selects other columns than its recorded mask")
    return result


def combine(old: EditDelta, step: EditDelta) -> EditDelta:
    """Two changes to the same columns as one delta (factors side by side when both are factored)."""
    if old.is_factored and step.is_factored:
        return EditDelta.from_factors(old.mask, torch.cat([old.g, step.g], 1), torch.cat([old.a, step.a], 1))
    return EditDelta(mask=old.mask, dense_=old.dense() + step.dense())


def reoptimise(runtime: "Runtime", edit: EditRecord, reason: str, detail: dict[str, Any] | None = None) -> EditRecord:
    """Re-optimise an applied edit on its own mask from the memory as it stands (its recorded
    contribution included), with its recorded unrelated sample, and replace its recorded
    contribution: W_m -= old delta, += new delta (= old + this optimisation's change), scores
    included. Starting from where it is disturbs the edits sharing its columns least. On any
    failure its columns are restored exactly and the ledger is unchanged."""
    editor, memory = runtime.editor, runtime.editor.memory
    old = runtime.store.load_delta(edit)
    columns = old.mask.to(memory.weight.device)
    saved = memory.weight[:, columns].clone()
    try:
        step = retrain(editor, edit)
        step.delta.apply_to(memory.weight, 1.0)
        result = dataclasses.replace(step, delta=combine(old, step.delta))
        result.scores = editor.score_edit(result, edit.rephrases)
        record = runtime.store.mark_replayed(edit, result, reason=reason, detail=detail)
    except BaseException:
        memory.weight[:, columns] = saved
        raise
    finally:
        memory.last = None
    log.info("edit %d replayed: loss %.4f -> %.4f in %d steps", edit.id, step.losses[0], step.final_loss, step.steps)
    return record


# -- rollback jobs ---------------------------------------------------------------------------------


@dataclass
class RollbackReport:
    """What a rollback did. `seconds` is the rollback itself (scoring, ledger, subtraction, index);
    the replays are counted apart in `replay_seconds`."""

    rolled_back: int
    job: str
    exact: bool
    checked: list[int]
    replayed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # replays that failed: the edit keeps its delta
    worse: list[int] = field(default_factory=list)  # still worse than before after the last round of replays
    seconds: float = 0.0
    replay_seconds: float = 0.0
    captured: int = 0  # prompts whose activations had to be captured first (a cold cache)
    remaining: int = 0  # replays left for later chunks
    done: bool = False

    def summary(self) -> dict[str, Any]:
        """The CLI's --json shape: {"rolled_back", "checked", "replayed", "seconds"} (total seconds)."""
        return {"rolled_back": self.rolled_back, "checked": self.checked, "replayed": self.replayed,
                "seconds": round(self.seconds + self.replay_seconds, 4)}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failed"] = {str(k): v for k, v in self.failed.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RollbackReport":
        report = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        report.failed = {int(k): v for k, v in report.failed.items()}
        return report


def _require_writer(runtime: "Runtime") -> None:
    if runtime.lock is None or not runtime.persistent:
        raise RollbackError("this runtime is read-only (it does not hold the memory's writer lock)")


def new_job() -> str:
    return f"rollback-{uuid.uuid4().hex}"


def begin_rollback(runtime: "Runtime", ref: int | str, reason: str | None = None, exact: bool = False,
                   job: str | None = None, actor: str | None = None) -> RollbackReport:
    """The rollback itself, without the replays it calls for (`continue_rollback` runs those).

    Refuses (RollbackError, nothing changed) an unknown edit, one of another memory, or one that
    is not applied. Fast mode: checks the overlapping edits, marks the edit rolled back, takes
    its delta out of W_m and its mask out of the index. Exact mode: the same, without checking
    (every later live edit is re-trained)."""
    _require_writer(runtime)
    edit = live_edit(runtime.store, runtime.name, ref)
    job = job or new_job()
    reason = reason or "rolled back"
    started = time.perf_counter()
    report = (_begin_exact if exact else _begin_fast)(runtime, edit, reason, job, actor)
    report.seconds = time.perf_counter() - started
    runtime.store.log_event(runtime.name, ROLLBACK_PROGRESS, edit, {
        "job": job, "processed": 0, "remaining": report.remaining, "seconds": 0.0,
        "rollback_seconds": report.seconds, "captured": report.captured}, actor=actor)
    log.info("edit %d rolled back (%s, job %s) in %.3fs; %d edits checked, %d to replay", edit.id, reason, job,
             report.seconds, len(report.checked), report.remaining)
    return report


def start_rollback(runtime: "Runtime", ref: int | str, reason: str | None = None, exact: bool = False,
                   job: str | None = None, budget: float | None = None, actor: str | None = None) -> RollbackReport:
    """`begin_rollback`, then the job's first chunk of replays (at most `budget` seconds, at
    least one replay). A job already started under the same name (a redelivered message, a job
    resumed at start) is continued instead; a pending one (a superseding edit's) rolls back the
    edit it names, and fails, recorded, if that edit is not live. `report.done` is False when
    replays remain for `continue_rollback`."""
    _require_writer(runtime)
    store = runtime.store
    recorded = store.job(job) if job is not None else None
    if recorded is not None and recorded.status != JOB_PENDING:
        if recorded.status == JOB_FAILED:
            raise RollbackError(f"job {job} failed: {recorded.error}")
        return continue_rollback(runtime, job, recorded.edit_id, budget, actor)
    existing = find_edit(store, ref) if recorded is None else None
    if job is not None and existing is not None and existing.status == ROLLED_BACK \
            and _load_job(store, existing, job) is not None:  # begun before the ledger recorded jobs
        return continue_rollback(runtime, job, existing.id, budget, actor)
    try:
        report = begin_rollback(runtime, ref if recorded is None else recorded.edit_id, reason, exact, job, actor)
    except RollbackError as exc:
        if recorded is not None:
            store.end_job(runtime.name, job, JOB_FAILED, JOB_FAILED_EVENT, recorded.edit_id,
                          {"job": job, "error": str(exc)}, error=str(exc), actor=actor)
        raise
    return continue_rollback(runtime, report.job, report.rolled_back, budget, actor)


def _begin_fast(runtime: "Runtime", edit: EditRecord, reason: str, job: str, actor: str | None) -> RollbackReport:
    """Score the overlapping edits with the edit, and those answering their target again
    without it (a trial subtraction; its mask skipped by retrieval), then the ledger, then
    W_m -= its delta and the index update (Editor.remove)."""
    store, editor, memory = runtime.store, runtime.editor, runtime.editor.memory
    delta = store.load_delta(edit)
    ids = overlapping(store, runtime.name, edit)
    cache = activation_cache(editor)
    captured = cache.ensure_ids(store, runtime.name, ids)
    before = cache.score(ids, memory.index)
    answering = [i for i in ids if bool(before[i].all())]
    columns = delta.mask.to(memory.weight.device)
    saved = memory.weight[:, columns].clone()
    delta.apply_to(memory.weight, -1.0)  # a trial: the same subtraction Editor.remove makes below
    try:
        after = cache.score(answering, memory.index, without=edit.id)
    finally:
        memory.weight[:, columns] = saved
    worse = [i for i in answering if not bool(after[i].all())]
    store.mark_rolled_back(edit, reason, actor, detail={"job": job, "exact": False, "checked": ids,
                                                        "answering": answering, "replay": worse}, job=job)
    editor.remove(edit.id, delta)
    return RollbackReport(rolled_back=edit.id, job=job, exact=False, checked=ids, captured=captured,
                          remaining=len(worse))


def _begin_exact(runtime: "Runtime", edit: EditRecord, reason: str, job: str, actor: str | None) -> RollbackReport:
    store = runtime.store
    later = sorted((e for e in store.applied(runtime.name) if e.seq > edit.seq), key=lambda e: e.seq)
    ids = [e.id for e in later]
    delta = store.load_delta(edit)
    store.mark_rolled_back(edit, reason, actor, detail={"job": job, "exact": True, "checked": ids, "replay": ids},
                           job=job)
    runtime.editor.remove(edit.id, delta)
    return RollbackReport(rolled_back=edit.id, job=job, exact=True, checked=ids, remaining=len(ids))


def continue_rollback(runtime: "Runtime", job: str, edit_id: int, budget: float | None = None,
                      actor: str | None = None) -> RollbackReport:
    """Run the next chunk of a started job (a finished one returns its recorded report)."""
    _require_writer(runtime)
    return _run_chunk(runtime, edit_id, job, budget, actor)


def rollback(runtime: "Runtime", ref: int | str, reason: str | None = None, exact: bool = False,
             job: str | None = None, actor: str | None = None) -> RollbackReport:
    """Roll back one edit and finish its job here (in-process: no chunk limit)."""
    report = start_rollback(runtime, ref, reason, exact, job, None, actor)
    while not report.done:
        report = continue_rollback(runtime, report.job, report.rolled_back, None, actor)
    return report


MAX_ROUNDS = 3  # replays of edits made worse, then of edits those replays made worse, ...


@dataclass
class _Job:
    """A rollback job as the ledger has it (the cursor): its rounds of replays and what is done."""

    report: RollbackReport
    answering: list[int]  # checked edits that answered their target before the rollback
    rounds: list[list[int]]  # edits to replay, per round
    processed: set[int]  # edits replayed (or failed) in the last round
    finished: bool


def _load_job(store: Store, edit: EditRecord, job: str) -> _Job | None:
    """Read the job from the event log: E's `rolled_back` event (round 0), `rollback_recheck`
    events (later rounds), `replayed`/`replay_failed` events, progress and done events."""
    started = next((e for e in store.events(edit, kinds=[ROLLED_BACK]) if e.detail.get("job") == job), None)
    if started is None:
        return None
    kinds = ["replayed", REPLAY_FAILED, ROLLBACK_RECHECK, ROLLBACK_PROGRESS, ROLLBACK_DONE]
    ours = [e for e in store.events(name=edit.memory, kinds=kinds, after=started.id) if e.detail.get("job") == job]
    done = next((e for e in ours if e.kind == ROLLBACK_DONE), None)
    if done is not None:
        return _Job(RollbackReport.from_dict(done.detail), [], [], set(), True)
    d = started.detail
    report = RollbackReport(rolled_back=edit.id, job=job, exact=bool(d.get("exact")), checked=list(d["checked"]))
    rounds = [list(d["replay"])]
    processed: set[int] = set()
    for event in ours:
        if event.kind == ROLLBACK_RECHECK:
            rounds.append(list(event.detail["replay"]))
            processed = set()
        elif event.kind in ("replayed", REPLAY_FAILED):
            processed.add(event.edit_id)
            if event.kind == "replayed" and event.edit_id not in report.replayed:
                report.replayed.append(event.edit_id)
            elif event.kind == REPLAY_FAILED:
                report.failed[event.edit_id] = event.detail.get("error", "")
        elif event.kind == ROLLBACK_PROGRESS:
            report.replay_seconds += float(event.detail.get("seconds", 0.0))
            report.seconds = float(event.detail.get("rollback_seconds", report.seconds))
            report.captured = max(report.captured, int(event.detail.get("captured", 0)))
    return _Job(report, list(d.get("answering", [])), rounds, processed, False)


def _run_chunk(runtime: "Runtime", edit_id: int, job: str, budget: float | None, actor: str | None) -> RollbackReport:
    store, name = runtime.store, runtime.name
    edit = store.edit(edit_id)
    state = _load_job(store, edit, job)
    if state is None:
        raise RollbackError(f"edit {edit_id} was not rolled back by job {job!r}")
    report = state.report
    if state.finished:
        return report
    live = {e.id: e for e in store.applied(name)}
    pending = sorted((live[i] for i in state.rounds[-1] if i not in state.processed and i in live), key=lambda e: e.seq)
    detail = {"job": job, "round": len(state.rounds) - 1}
    started = time.perf_counter()
    if report.exact:
        count = _exact_chunk(runtime, edit, detail, report, pending, budget, started)
    else:
        count = _fast_chunk(runtime, edit, detail, report, pending, budget, started)
    remaining = len(pending) - count
    if not remaining and not report.exact:
        remaining = _recheck(runtime, edit, state, actor)
    seconds = time.perf_counter() - started
    report.replay_seconds += seconds
    report.remaining = remaining
    store.log_event(name, ROLLBACK_PROGRESS, edit, {"job": job, "processed": count, "remaining": remaining,
                                                   "seconds": seconds, "rollback_seconds": report.seconds},
                    actor=actor)
    if remaining:
        return report
    report.done = True
    store.end_job(name, job, JOB_DONE, ROLLBACK_DONE, edit, report.to_dict(), actor=actor)
    if report.failed or report.worse:
        log.warning("rollback of edit %d: replays failed %s; still worse than before: %s", edit.id,
                    sorted(report.failed), report.worse)
    runtime._maybe_checkpoint()
    return report


def _recheck(runtime: "Runtime", rolled: EditRecord, state: _Job, actor: str | None) -> int:
    """Score the checked edits again after a round of replays (a replay moves the edits sharing
    its columns): those worse than before the rollback are the next round, up to MAX_ROUNDS.
    Returns how many edits the next round replays (0: the job is done)."""
    if not state.rounds[-1]:  # nothing was replayed: the memory is as the first scoring saw it
        return 0
    live = runtime.store.applied_masks(runtime.name)
    ids = [i for i in state.answering if i in live]
    cache = activation_cache(runtime.editor)
    cache.ensure_ids(runtime.store, runtime.name, ids)
    now = cache.score(ids, runtime.editor.memory.index)
    worse = [i for i in ids if not bool(now[i].all())]
    if not worse or len(state.rounds) >= MAX_ROUNDS:
        state.report.worse = worse
        return 0
    runtime.store.log_event(runtime.name, ROLLBACK_RECHECK, rolled, {
        "job": state.report.job, "round": len(state.rounds), "replay": worse}, actor=actor)
    return len(worse)


def _running(store: Store, job: str) -> bool:
    recorded = store.job(job)
    return recorded is not None and recorded.status == JOB_RUNNING


def _out_of_time(started: float, budget: float | None, count: int) -> bool:
    return budget is not None and count > 0 and time.perf_counter() - started >= budget


def _replay_failed(runtime: "Runtime", edit: EditRecord, detail: dict[str, Any], exc: Exception,
                   report: RollbackReport) -> None:
    error = f"{type(exc).__name__}: {exc}"
    log.warning("replay of edit %d failed (it keeps its recorded contribution): %s", edit.id, error)
    runtime.store.log_event(runtime.name, REPLAY_FAILED, edit, {**detail, "error": error})
    report.failed[edit.id] = error


REPLAY_ERRORS = (EditRefusedError, InvalidEditError, RollbackError)
# The store or the ledger cannot be written (disk full, read-only, the database gone) or this
# writer lost its lock: the job stops where it is, unfinished in the ledger, for the next worker.
# Any other error replaying one edit fails that replay (the edit keeps its recorded contribution).
INTERRUPTIONS = (OSError, pw.DatabaseError, FencingError)


def _fast_chunk(runtime: "Runtime", rolled: EditRecord, detail: dict[str, Any], report: RollbackReport,
                pending: list[EditRecord], budget: float | None, started: float) -> int:
    count = 0
    for edit in pending:
        if _out_of_time(started, budget, count):
            break
        try:
            reoptimise(runtime, edit, f"rollback of edit {rolled.id} made it worse", detail)
            if edit.id not in report.replayed:
                report.replayed.append(edit.id)
        except INTERRUPTIONS:
            raise
        except Exception as exc:  # noqa: BLE001 - REPLAY_ERRORS and any other fault of this one replay
            _replay_failed(runtime, edit, detail, exc, report)
        count += 1
    return count


def first_applied_version(store: Store, edit: EditRecord) -> int:
    """The memory version at which `edit` first entered W_m."""
    for event in store.events(edit, kinds=[APPLIED]):
        return int(event.detail["version"])
    raise RollbackError(f"edit {edit.id} has no 'applied' event")


def _exact_chunk(runtime: "Runtime", rolled: EditRecord, detail: dict[str, Any], report: RollbackReport,
                 pending: list[EditRecord], budget: float | None, started: float) -> int:
    """Re-train the next later edits on `work` = the memory as if `rolled` had never been applied.

    `work` holds the earlier live edits (from the newest checkpoint before `rolled` was applied)
    and the later ones this job has re-trained, in sequence order; while training, W_m is `work`.
    At the end W_m is `work` plus the recorded deltas of every other live edit (the ones still
    to re-train, and any applied while the job ran), as the ledger says."""
    store, name, editor = runtime.store, runtime.name, runtime.editor
    memory = editor.memory
    live = store.applied(name)
    earlier = [e for e in live if e.seq < rolled.seq]
    work = store.weight_of(name, earlier, before_version=first_applied_version(store, rolled))
    work = work.to(memory.weight.device)
    in_work = {e.id for e in earlier}
    waiting = {e.id for e in pending}
    for edit in sorted((e for e in live if e.id in report.checked and e.id not in waiting), key=lambda e: e.seq):
        store.load_delta(edit).apply_to(work, 1.0)  # re-trained by this job already (or kept, if that failed)
        in_work.add(edit.id)
    count = 0
    try:
        for edit in pending:
            if _out_of_time(started, budget, count):
                break
            memory.weight.copy_(work)
            try:
                result = retrain(editor, edit)
                result.delta.apply_to(memory.weight, 1.0)
                result.scores = editor.score_edit(result, edit.rephrases)
                store.mark_replayed(edit, result, reason=f"exact rollback of edit {rolled.id}", detail=detail)
                result.delta.apply_to(work, 1.0)  # the same sum as in W_m, bit for bit
                report.replayed.append(edit.id)
            except INTERRUPTIONS:
                raise
            except Exception as exc:  # noqa: BLE001 - REPLAY_ERRORS and any other fault of this one replay
                _replay_failed(runtime, edit, detail, exc, report)
                store.load_delta(edit).apply_to(work, 1.0)
            in_work.add(edit.id)
            count += 1
    finally:
        memory.weight.copy_(work)
        for edit in store.applied(name):
            if edit.id not in in_work:
                store.load_delta(edit).apply_to(memory.weight, 1.0)
        memory.last = None
    return count


# -- task messages (workers/tasks.py) ----------------------------------------------------------------


def _task_outcome(job: str, kind: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"request_id": job, "kind": kind, "status": status, "edit_id": None, "reason": None, **fields}


def rollback_message(runtime: "Runtime", task_id: str, message: Any,
                     budget: float | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Handle one `memoir.rollback` message: {request_id, edit, reason, exact, name} starts a job
    named by the request id; {job, edit, name} continues one. Returns the status record to
    publish (under the job's request id) and the message of the next chunk, if one is needed.

    A refused rollback (unknown edit, not applied, wrong memory, bad message) or a failed one
    gives a `failed` record and changes nothing; a lost writer lock (FencingError) raises, and so
    does any error after the job began (its edit is rolled back; the job, `running` in the ledger,
    is finished by the next worker at start: `Runtime.resume`)."""
    from pipeline.schema import RequestError, check_request_id, validate_rollback
    from store import FencingError

    if not isinstance(message, dict):
        return _task_outcome(task_id, "rollback", "failed",
                             reason=f"the message is not a JSON object but {type(message).__name__}"), None
    job = message.get("job", task_id)
    try:  # every field as a producer's would be (pipeline/schema.py); a chunk's edit is a ledger id
        check_request_id(job, "job")
        checked = validate_rollback(message.get("edit"), reason=message.get("reason"), exact=message.get("exact", False),
                                    name=message.get("name", runtime.name), request_id=job)
        if "job" in message and not isinstance(checked.edit, int):
            raise RequestError("edit", f"a rollback chunk names its edit by ledger id, got {checked.edit!r}")
    except RequestError as exc:
        return _task_outcome(task_id, "rollback", "failed", reason=str(exc)), None
    try:
        if checked.name != runtime.name:
            raise RollbackError(f"the request is for memory {checked.name!r}; this worker serves {runtime.name!r}")
        if "job" in message:
            report = continue_rollback(runtime, job, checked.edit, budget)
        else:
            report = start_rollback(runtime, checked.edit, checked.reason, checked.exact, job, budget)
    except FencingError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad rollback must not stop the worker; the memory is restored
        if _running(runtime.store, job):  # its edit is out of W_m: the job must finish, not fail; the task
            raise  # stops the worker, the message is requeued and the next worker finishes the job at start
        log.warning("rollback %s failed: %s", job, exc)
        return _task_outcome(job, "rollback", "failed", reason=f"{type(exc).__name__}: {exc}"), None
    outcome = _task_outcome(job, "rollback", "done" if report.done else "running", edit_id=report.rolled_back,
                            exact=report.exact, remaining=report.remaining, **report.summary())
    if report.done:
        return outcome, None
    return outcome, {"request_id": f"{job}.{len(report.replayed) + len(report.failed)}", "job": job,
                     "edit": report.rolled_back, "name": runtime.name}


__all__ = [
    "RollbackError", "RollbackReport", "begin_rollback", "continue_rollback", "find_edit", "live_edit",
    "matching_edits", "new_job", "overlapping", "reoptimise", "retrain", "rollback", "rollback_message",
    "start_rollback",
]
