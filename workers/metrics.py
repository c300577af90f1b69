"""Prometheus metrics of `memoir worker` (`--metrics-port`), in their own `CollectorRegistry`.

`memoir_worker_edits_total{status}` (applied, failed: recorded in the ledger and refused
there; refused: never recorded, e.g. a malformed request; duplicate: a request seen before),
`memoir_worker_edit_seconds`, `memoir_worker_rollbacks_total{status}`,
`memoir_worker_replays_total{status}`, `memoir_worker_queue_depth` (read from Redis) and
`memoir_worker_live_edits`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.prometheus import nan_on_error

if TYPE_CHECKING:
    from workers.runtime import Runtime

EDIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """The worker's metrics, counted from Celery's task signals (workers/tasks.py is not touched)."""

    def __init__(self, runtime: "Runtime", redis_client: Any, queue: str) -> None:
        from pipeline import settings

        self.registry = registry = CollectorRegistry()
        self.edits = Counter("memoir_worker_edits", "Edit messages done, by outcome.", ["status"], registry=registry)
        self.edit_seconds = Histogram("memoir_worker_edit_seconds", "Seconds an edit message took.",
                                      buckets=EDIT_BUCKETS, registry=registry)
        self.rollbacks = Counter("memoir_worker_rollbacks", "Rollback messages (and chunks) done, by status.",
                                 ["status"], registry=registry)
        self.replays = Counter("memoir_worker_replays", "Replay messages (and chunks) done, by status.",
                               ["status"], registry=registry)
        Gauge("memoir_worker_queue_depth", "Messages waiting in the memory's queue (read from Redis).",
              registry=registry).set_function(nan_on_error(lambda: redis_client.llen(queue)))
        Gauge("memoir_worker_live_edits", "Live edits in the worker's memory.",
              registry=registry).set_function(nan_on_error(lambda: runtime.editor.memory.index.edit_count))
        self._kinds = {settings.APPLY_TASK: "edit", settings.ROLLBACK_TASK: "rollback",
                       settings.REPLAY_TASK: "replay"}
        self._started: dict[str, float] = {}

    def task_started(self, task_id: str) -> None:
        self._started[task_id] = time.perf_counter()

    def task_done(self, task_name: str, task_id: str, outcome: Any) -> None:
        """Count one task's outcome (an outcome that is not a dict: the task raised, e.g. to stop)."""
        seconds = time.perf_counter() - self._started.pop(task_id, time.perf_counter())
        kind = self._kinds.get(task_name)
        status = outcome.get("status", "unknown") if isinstance(outcome, dict) else "error"
        if kind == "edit":
            if isinstance(outcome, dict) and outcome.get("duplicate"):
                status = "duplicate"
            elif isinstance(outcome, dict) and outcome.get("edit_id") is None:
                status = "refused"
            self.edits.labels(status).inc()
            self.edit_seconds.observe(seconds)
        elif kind == "rollback":
            self.rollbacks.labels(status).inc()
        elif kind == "replay":
            self.replays.labels(status).inc()

    def connect(self) -> "WorkerMetrics":
        """Count the tasks this process runs (Celery's task_prerun / task_postrun signals)."""
        from celery import signals

        signals.task_prerun.connect(lambda task_id=None, **_: self.task_started(task_id), weak=False)
        signals.task_postrun.connect(
            lambda task=None, task_id=None, retval=None, **_: self.task_done(task.name, task_id, retval), weak=False)
        return self

    def serve(self, host: str, port: int) -> int:
        """Expose the metrics over HTTP at host:port (a thread); returns the port bound."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]


__all__ = ["WorkerMetrics"]
