"""The worker's mirror of ledger status changes in Redis, where producers read them.

`pipeline.client.status(request_id)` never reads the worker's disk: it reads
`memoir:status:<request_id>`, which this module writes. `MirroringStore` is the store with one
addition: after each status change it commits (queued, applying, applied, failed, rolled back,
replayed) it publishes the edit's new status record. The ledger stays the truth; a mirror
write that fails is logged and never undoes or blocks a ledger change.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline import settings
from store import EditRecord, Store
from pipeline.notify import publish_change

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def edit_status(edit: EditRecord) -> dict[str, Any]:
    """A ledger row as the status record producers see."""
    return {"request_id": edit.request_id, "name": edit.memory, "kind": "edit", "status": edit.status,
            "edit_id": edit.id, "seq": edit.seq, "scores": edit.scores, "reason": edit.reason,
            "loss": edit.loss, "steps": edit.steps, "seconds": edit.seconds, "updated_at": _now()}


class StatusBoard:
    """Writes status records (and the worker's presence) to Redis."""

    def __init__(self, client: "redis.Redis", name: str) -> None:
        self.redis = client
        self.name = name
        self.ttl = settings.key_ttl()

    def publish(self, record: dict[str, Any]) -> None:
        """Set `memoir:status:<request_id>` to `record`; logged, never raised, on failure."""
        request_id = record.get("request_id")
        if not isinstance(request_id, str):
            return
        record = {"name": self.name, "kind": "edit", **record, "updated_at": _now()}
        try:
            self.redis.set(settings.status_key(request_id), settings.dumps(record), ex=self.ttl)
        except Exception as exc:  # noqa: BLE001 - the ledger holds the truth; a restart re-mirrors pending rows
            log.error("could not mirror the status of %s to Redis: %s", request_id, exc)

    def publish_outcome(self, outcome: dict[str, Any]) -> None:
        """Mirror a task's outcome. A request refused before it was recorded (no edit id) does
        not overwrite a status the ledger backs (its id may belong to another edit)."""
        if outcome.get("edit_id") is None:
            try:
                current = self.redis.get(settings.status_key(str(outcome.get("request_id"))))
            except Exception:  # noqa: BLE001
                current = None
            if current and json.loads(current).get("edit_id") is not None:
                log.warning("request %s refused (%s); its status stays as the ledger has it",
                            outcome.get("request_id"), outcome.get("reason"))
                return
        self.publish({k: v for k, v in outcome.items() if k != "duplicate"})

    def publish_edit(self, edit: EditRecord) -> None:
        self.publish(edit_status(edit))


class Presence:
    """Announces the live worker of a memory (`memoir:worker:<name>`), refreshed by a thread."""

    def __init__(self, client: "redis.Redis", name: str, info: dict[str, Any], every: float = 10.0) -> None:
        self.redis, self.key, self.every = client, settings.worker_key(name), every
        self.info = {"name": name, "queue": settings.queue_name(name), "host": socket.gethostname(),
                     "pid": os.getpid(), "started_at": _now(), **info}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memoir-presence", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.redis.set(self.key, settings.dumps(self.info), ex=int(3 * self.every))
            except Exception as exc:  # noqa: BLE001 - presence is advisory
                log.warning("could not announce the worker in Redis: %s", exc)
            if self._stop.wait(self.every):
                return

    def start(self) -> "Presence":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.redis.delete(self.key)
        except Exception:  # noqa: BLE001
            pass


class MirroringStore(Store):
    """A `Store` that publishes every status change it commits to `board` (when one is set)."""

    board: StatusBoard | None = None

    def _tell(self, edit: EditRecord) -> EditRecord:
        if self.board is not None:
            self.board.publish_edit(edit)
            publish_change(self.board.redis, self, edit)  # wakes `memoir serve` (workers/notify.py)
        return edit

    def record_request(self, *args: Any, **kwargs: Any) -> tuple[EditRecord, bool]:
        edit, created = super().record_request(*args, **kwargs)
        self._tell(edit)
        return edit, created

    def mark_applying(self, *args: Any, **kwargs: Any) -> EditRecord:
        return self._tell(super().mark_applying(*args, **kwargs))

    def mark_failed(self, *args: Any, **kwargs: Any) -> EditRecord:
        return self._tell(super().mark_failed(*args, **kwargs))

    def mark_applied(self, *args: Any, **kwargs: Any) -> EditRecord:
        return self._tell(super().mark_applied(*args, **kwargs))

    def mark_rolled_back(self, *args: Any, **kwargs: Any) -> EditRecord:
        return self._tell(super().mark_rolled_back(*args, **kwargs))

    def mark_replayed(self, *args: Any, **kwargs: Any) -> EditRecord:
        return self._tell(super().mark_replayed(*args, **kwargs))


__all__ = ["MirroringStore", "Presence", "StatusBoard", "edit_status"]
