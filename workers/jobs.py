"""Running the ledger's jobs (store/jobs.py) on a Runtime: one job, the jobs of one superseding
edit, and at start every unfinished job of the memory (`Runtime.resume`, after the pending edits).

A job runs through the same code whoever runs it (the apply or rollback task, `memoir apply`,
`memoir rollback`, a worker starting): `workers.rollback.rollback` under the job's name, which
begins a pending job and continues a running one from the ledger's cursor. A superseding job
waits for its edit: it runs once that edit is applied and fails, recorded, when the edit failed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from store import APPLIED, EditRecord
from store.jobs import FAILED, JOB_FAILED, PENDING, SUPERSEDE, UNFINISHED, JobRecord
from store.records import PENDING as EDIT_PENDING
from workers.rollback import INTERRUPTIONS, RollbackError, RollbackReport, rollback

if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)

SUPERSEDES = "supersedes"  # event of a superseding edit: {"replaced": edit id, "job": its rollback job}


def run_job(runtime: "Runtime", job: JobRecord, actor: str | None = None) -> RollbackReport | None:
    """Run one job to its end (in-process: no chunk limit). None when it did not run: a superseding
    edit still pending, a job refused (recorded `failed`: nothing was changed), or one that raised
    an error other than the store's (recorded `failed` with it, so that a worker can still start).
    Errors that interrupt a job (workers.rollback.INTERRUPTIONS) propagate; the job stays unfinished."""
    store, name = runtime.store, runtime.name
    if job.kind == SUPERSEDE and job.status == PENDING:
        by = store.edit(job.by_edit_id)
        if by.status in EDIT_PENDING:
            return None  # its edit first (Runtime.resume applies the pending edits before the jobs)
        if by.status != APPLIED:
            error = f"the superseding edit {by.id} is {by.status}"
            store.end_job(name, job.job, FAILED, JOB_FAILED, job.edit_id, {"job": job.job, "error": error},
                          error=error, actor=actor)
            return None
        if not any(e.detail.get("job") == job.job for e in store.events(by, kinds=[SUPERSEDES])):
            store.log_event(name, SUPERSEDES, by, {"replaced": job.edit_id, "job": job.job}, actor=actor)
    try:
        return rollback(runtime, job.edit_id, job.reason, job.exact, job=job.job, actor=actor)
    except RollbackError as exc:  # refused before it began: start_rollback recorded it failed
        log.warning("job %s: %s", job.job, exc)
        return None
    except INTERRUPTIONS:
        raise
    except Exception as exc:  # a defect, not the store: it would fail again at every start, so end it
        log.exception("job %s failed", job.job)
        error = f"{type(exc).__name__}: {exc}"
        store.end_job(name, job.job, FAILED, JOB_FAILED, job.edit_id, {"job": job.job, "error": error},
                      error=error, actor=actor)
        return None


def run_superseding_jobs(runtime: "Runtime", new: EditRecord, actor: str | None = None) -> list[RollbackReport]:
    """The unfinished jobs of superseding edit `new` (the rollbacks of the edits it replaces), run
    now: once it is applied they roll those back; if it failed they fail."""
    jobs = runtime.store.jobs(runtime.name, status=UNFINISHED, by=new.id)
    return [r for r in (run_job(runtime, job, actor) for job in jobs) if r is not None]


def resume_jobs(runtime: "Runtime", actor: str | None = None) -> list[RollbackReport]:
    """Finish every unfinished job of the memory, oldest first: those a crash, a lost message or
    an unwritable store left undone. What a worker runs at start, after the pending edits."""
    jobs = runtime.store.jobs(runtime.name, status=UNFINISHED)
    reports = [r for r in (run_job(runtime, job, actor) for job in jobs) if r is not None]
    if jobs:
        log.info("resumed %d unfinished jobs of %r: %s", len(jobs), runtime.name, ", ".join(j.job for j in jobs))
    return reports


__all__ = ["SUPERSEDES", "resume_jobs", "run_job", "run_superseding_jobs"]
