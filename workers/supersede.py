"""Superseding edits: an edit request that names the edit(s) it replaces (`replaces`: a ledger
id, a request id or "same-prompt") is applied and those edits are rolled back in the same
operation (workers/rollback.py), once the new edit is applied. The ledger links them: the new
edit's `replaces`, a `supersedes` event on it per replaced edit ({"replaced", "job"}), and on
the replaced edit the `rolled_back` event of job `supersede-<new>-<old>`. Those jobs are
recorded `pending` with the new edit (store/jobs.py) and run by workers/jobs.py: here once it is
applied, and by the next worker at start when a crash left them undone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.schema import SAME_PROMPT, RequestError, check_replaces, check_request_id
from store import EditRecord, Store
from store.jobs import supersede_job as job_name
from workers.jobs import SUPERSEDES, run_superseding_jobs
from workers.rollback import RollbackError, live_edit

if TYPE_CHECKING:
    from workers.runtime import Runtime


def replaced_edits(store: Store, name: str, request: dict[str, Any]) -> list[EditRecord]:
    """The live edits a request names in `replaces`: an edit id, a request id, or "same-prompt"
    (the live edits with exactly the same prompt). RollbackError when it names nothing live."""
    ref = request.get("replaces")
    if ref is None:
        return []
    if ref == SAME_PROMPT:
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise RollbackError("replaces 'same-prompt' needs a prompt")
        found = [e for e in store.applied(name) if e.prompt == prompt]
        if not found:
            raise RollbackError(f"no live edit of memory {name!r} has this prompt")
        return found
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise RollbackError(f"replaces must be an edit id, a request id or {SAME_PROMPT!r}")
    return [live_edit(store, name, ref)]


def supersede_job(new: EditRecord, old: EditRecord) -> str:
    """The rollback job of `old` superseded by `new`: named by both, so a redelivered request
    finds (and finishes) the job a crash interrupted."""
    return job_name(new.id, old.id)


def apply_superseding(runtime: "Runtime", request: Any, actor: str | None = None) -> dict[str, Any]:
    """Apply an edit request that may name the edit(s) it replaces (`replaces`: a ledger id, a
    request id or "same-prompt"), and roll those back in the same operation once the new edit
    is applied (the new edit, sharing their prompt's columns, is then one of the edits checked).
    Without `replaces` this is `runtime.apply_request`; the worker and `memoir apply` call this.

    The outcome is apply_request's plus `superseded` (the rollbacks' summaries). The ledger
    links them: the new edit's `replaces` (the first replaced edit), a `supersedes` event on it
    per replaced edit ({"replaced", "job"}), and on the replaced edit the `rolled_back` event of
    job `supersede-<new>-<old>` with the reason "superseded by edit <new>". A new request naming
    an unknown, failed, already rolled-back or otherwise not live edit is refused before it is
    recorded (nothing changes); a redelivered one finishes the rollbacks a crash left undone.
    The rollbacks run to the end here, replays included (not in chunks)."""
    if not isinstance(request, dict) or request.get("replaces") is None:
        return runtime.apply_request(request)
    store, name = runtime.store, runtime.name
    request_id = request.get("request_id") or request.get("id")
    try:
        ref = check_replaces(request["replaces"])
        if request_id is not None:
            check_request_id(request_id)
    except RequestError as exc:
        return {**runtime._refused(request_id, str(exc)), "superseded": []}
    supersedes = None
    if request_id is not None and store.edit_by_request(request_id) is not None:
        request = {**request, "replaces": None}  # recorded already, with the jobs of what it replaces
    else:
        try:
            named = replaced_edits(store, name, {**request, "replaces": ref})
        except RollbackError as exc:
            return {**runtime._refused(request_id, f"replaces: {exc}"), "superseded": []}
        request, supersedes = {**request, "replaces": named[0].id}, [e.id for e in named]
    outcome = runtime.apply_request(request, supersedes=supersedes)
    if outcome["edit_id"] is None:
        return {**outcome, "superseded": []}
    reports = run_superseding_jobs(runtime, store.edit(outcome["edit_id"]), actor)
    return {**outcome, "superseded": [r.summary() for r in reports]}


__all__ = ["SAME_PROMPT", "SUPERSEDES", "apply_superseding", "replaced_edits", "supersede_job"]
