"""Prometheus metrics of `memoir serve` (`GET /metrics`).

Each set lives in its own `CollectorRegistry` (a process may hold several apps, e.g. in tests).
Values that another component already knows (the snapshot served, the follower's lag, the queue
length in Redis, the live edits) are read when Prometheus scrapes, not copied on every change.

Server: `memoir_http_requests_total{route,status}`, `memoir_http_request_duration_seconds{route}`,
`memoir_prompt_tokens_total`, `memoir_generated_tokens_total`, `memoir_batch_size` (sequences per
batch), `memoir_prompts_total{use_memory}`, `memoir_prompts_retrieved_total` (prompts that
retrieved an edit), `memoir_memory_seq`, `memoir_memory_version`, `memoir_memory_live_edits`,
`memoir_memory_reloads` and `memoir_memory_lag_seconds` (since the follower last read the
ledger; 0 when pinned).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pipeline.prometheus import nan_on_error

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


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
        self.seq.set_function(nan_on_error(lambda: served().seq))
        self.version.set_function(nan_on_error(lambda: served().version))
        self.live_edits.set_function(nan_on_error(lambda: len(served().snapshot.edits)))
        self.reloads.set_function(nan_on_error(lambda: live.engine.reloads))
        self.lag.set_function(nan_on_error(
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

    def _label(self, scope: dict[str, Any]) -> str:
        """The route's template (`/v1/edits/{edit_id}`), or for a request answered before routing
        (413, 503, ...) its path if the app has it, else "other": bounded label values."""
        template = getattr(scope.get("route"), "path", None)
        if isinstance(template, str):
            return template
        return scope["path"] if scope["path"] in self.routes() else "other"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self._label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


__all__ = ["RequestMetrics", "ServerMetrics"]
