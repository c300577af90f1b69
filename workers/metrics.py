"""Prometheus metrics of `memoir serve` (`GET /metrics`) and `memoir worker` (`--metrics-port`).

Each set lives in its own `CollectorRegistry` (a process may hold several apps, e.g. in tests).
Values that another component already knows (the snapshot served, the follower's lag, the queue
length in Redis, the live edits) are read when Prometheus scrapes, not copied on every change.

Server: `memoir_http_requests_total{route,status}`, `memoir_http_request_duration_seconds{route}`,
`memoir_prompt_tokens_total`, `memoir_generated_tokens_total`, `memoir_batch_size` (sequences per
batch), `memoir_prompts_total{use_memory}`, `memoir_prompts_retrieved_total` (prompts that
retrieved an edit), `memoir_memory_seq`, `memoir_memory_version`, `memoir_memory_live_edits`,
`memoir_memory_reloads` and `memoir_memory_lag_seconds` (since the follower last read the
ledger; 0 when pinned).

Worker: `memoir_worker_edits_total{status}` (applied, failed: recorded in the ledger and refused
there; refused: never recorded, e.g. a malformed request; duplicate: a request seen before),
`memoir_worker_edit_seconds`, `memoir_worker_rollbacks_total{status}`,
`memoir_worker_replays_total{status}`, `memoir_worker_queue_depth` (read from Redis) and
`memoir_worker_live_edits`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
EDIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _nan_on_error(read: Callable[[], float]) -> Callable[[], float]:
    def safe() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - a scrape must not fail on one value (not loaded yet, Redis down)
            return float("nan")

    return safe


class ServerMetrics:
    """The HTTP server's metrics; `bind(live)` points the gauges at the engine once it is loaded."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("memoir_http_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("memoir_http_request_duration_seconds",
                                 "Seconds from a request's arrival to its response's last byte.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("memoir_prompt_tokens", "Prompt tokens generated from.", registry=registry)
        self.tokens = Counter("memoir_generated_tokens", "Tokens generated.", registry=registry)
        self.batch_size = Histogram("memoir_batch_size", "Sequences generated together in one batch.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.prompts = Counter("memoir_prompts", "Prompts generated, by whether the memory was used.",
                               ["use_memory"], registry=registry)
        self.retrieved = Counter("memoir_prompts_retrieved", "Prompts that retrieved an edit of the memory.",
                                 registry=registry)
        self.seq = Gauge("memoir_memory_seq", "Ledger sequence number of the memory served.", registry=registry)
        self.version = Gauge("memoir_memory_version", "Version of the memory served.", registry=registry)
        self.live_edits = Gauge("memoir_memory_live_edits", "Live edits in the memory served.", registry=registry)
        self.reloads = Gauge("memoir_memory_reloads", "Memory snapshots installed since start.",
                             registry=registry)
        self.lag = Gauge("memoir_memory_lag_seconds",
                         "Seconds since the ledger was last read for a newer snapshot (0 when pinned).",
                         registry=registry)
        for gauge in (self.seq, self.version, self.live_edits, self.reloads, self.lag):
            gauge.set(float("nan"))

    def bind(self, live: Any) -> None:
        """Read the served snapshot from `live.engine` and the lag from `live.follower` at scrape time."""
        served = lambda: live.engine.served  # noqa: E731
        self.seq.set_function(_nan_on_error(lambda: served().seq))
        self.version.set_function(_nan_on_error(lambda: served().version))
        self.live_edits.set_function(_nan_on_error(lambda: len(served().snapshot.edits)))
        self.reloads.set_function(_nan_on_error(lambda: live.engine.reloads))
        self.lag.set_function(_nan_on_error(
            lambda: 0.0 if live.follower is None else live.follower.health()["lag_s"]))

    def batch(self, rows: list[Any], use_memory: bool) -> None:
        """One generated batch: its size, tokens, and which prompts retrieved an edit."""
        self.batch_size.observe(len(rows))
        self.prompt_tokens.inc(sum(len(row.ids) for row in rows))
        self.tokens.inc(sum(len(row.tokens) for row in rows))
        self.prompts.labels(str(use_memory).lower()).inc(len(rows))
        self.retrieved.inc(sum(1 for row in rows if row.retrieved))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts each HTTP request by route and status, and times it to its last byte."""

    def __init__(self, app: Any, metrics: ServerMetrics, routes: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes() else "other"  # bounded label values
        started, status = time.perf_counter(), 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


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
              registry=registry).set_function(_nan_on_error(lambda: redis_client.llen(queue)))
        Gauge("memoir_worker_live_edits", "Live edits in the worker's memory.",
              registry=registry).set_function(_nan_on_error(lambda: runtime.editor.memory.index.edit_count))
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


__all__ = ["RequestMetrics", "ServerMetrics", "WorkerMetrics"]
