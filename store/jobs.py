"""Jobs in the ledger: rollbacks, and the rollbacks a superseding edit calls for.

A job row is what the next worker resumes at start, like a `queued`/`applying` edit: a rollback
job is recorded `running` in the transaction that rolls its edit back (so an edit is never out of
W_m without a job to finish its replays), a superseding job `pending` in the transaction that
records the superseding edit (so the edits it replaces are known before anything is applied).
A job ends `done` (with its `rollback_done` event, in one transaction) or `failed` (refused before
it changed anything: the edit was no longer live, the superseding edit failed). Its progress is
in the event log (workers/rollback.py reads it back); the row only says what is left to finish.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from store.records import iso

ROLLBACK, SUPERSEDE = "rollback", "supersede"
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
UNFINISHED = (PENDING, RUNNING)
JOB_FAILED = "job_failed"  # the event that ends a failed job


def supersede_job(new_id: int, old_id: int) -> str:
    """The job that rolls back edit `old_id` because edit `new_id` replaces it."""
    return f"supersede-{new_id}-{old_id}"


@dataclass(frozen=True)
class JobRecord:
    """One job: which edit it rolls back, why, and whether it is finished."""

    id: int
    memory: str
    job: str
    kind: str  # ROLLBACK or SUPERSEDE
    edit_id: int  # the edit rolled back
    by_edit_id: int | None  # SUPERSEDE: the edit that replaces it
    reason: str | None
    exact: bool
    status: str
    error: str | None
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"], out["updated_at"] = iso(self.created_at), iso(self.updated_at)
        return out


__all__ = ["DONE", "FAILED", "JOB_FAILED", "JobRecord", "PENDING", "ROLLBACK", "RUNNING", "SUPERSEDE", "UNFINISHED",
           "supersede_job"]
