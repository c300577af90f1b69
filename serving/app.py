"""The HTTP app (FastAPI): the OpenAI-style routes (serving/openai.py) over a served model, and
`GET /v1/memory` (the snapshot served: seq, version, live edits, config), `GET /metrics`
(Prometheus, serving/metrics.py), `GET /healthz` (liveness; `following` and `lag_s` say whether
the ledger is being read) and `GET /readyz` (503 until the model and memory are loaded).

Bounded (`serving.http.Limits`): a request body of at most `max_body_bytes` (413), sent within
`request_timeout` (408); at most `max_queue` requests admitted at once (503 with Retry-After);
each answered within `request_timeout` (504, its generation stopped). Parsing, tokenisation and
length checks run on worker threads: the event loop only moves bytes. One generation thread
(`serving.engine.Engine`) owns the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from serving.edits import EditAPI, edit_routes, is_write
from serving.engine import Engine, GenerationError, InvalidRequest
from serving.http import Bounds, Limits, NotReady, error
from serving.keys import Keys, RequireKeys
from serving.metrics import RequestMetrics, ServerMetrics
from serving.openai import openai_routes

log = logging.getLogger(__name__)


def _paths(routes: list[Any]) -> set[str]:
    """The paths the app answers, included routers' too (the metrics' bounded route labels)."""
    paths = set()
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            paths.add(route.path)
        elif hasattr(route, "original_router"):  # FastAPI >= 0.165 keeps an included router whole
            paths |= _paths(route.original_router.routes)
    return paths


def create_app(start: Callable[[], tuple[Engine, Any]], limits: Limits = Limits(), on_ready: Any = None,
               on_failure: Any = None, edits: EditAPI | None = None, keys: Keys | None = None) -> FastAPI:
    """The FastAPI app. It answers at once; `start()` (the model and memory loading: (engine,
    follower or None)) runs on a thread, and the engine and follower are started when it returns.
    Until then `/healthz` says "loading" and `/readyz` and the API answer 503. `on_ready()` is
    called once serving, `on_failure(exc)` if `start()` fails. Both are stopped with the app.
    `edits` adds the edit API (serving/edits.py); `keys` (serving/keys.py), when it holds any,
    guards every /v1/ route."""
    live = SimpleNamespace(engine=None, follower=None)
    metrics = ServerMetrics()
    metrics.bind(live)

    def boot() -> None:
        try:
            engine, follower = start()
            engine.metrics = metrics
            engine.start()
            if follower is not None:
                follower.start()
            live.engine, live.follower = engine, follower
        except BaseException as exc:  # noqa: BLE001 - reported to the command, which exits
            log.error("could not load the model and memory: %s", exc)
            if on_failure is not None:
                on_failure(exc)
            return
        if on_ready is not None:
            on_ready()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=boot, name="memoir-load", daemon=True).start()
        try:
            yield
        finally:
            if live.follower is not None:
                live.follower.stop()
            if live.engine is not None:
                live.engine.stop()

    app = FastAPI(title="memoir", lifespan=lifespan)
    app.add_middleware(Bounds, limits=limits)
    if keys:  # outside Bounds: a request without a valid key costs no body read and no place in line
        app.add_middleware(RequireKeys, keys=keys, is_write=is_write)
    app.add_middleware(RequestMetrics, metrics=metrics,  # outermost: counts Bounds' answers too
                       routes=lambda: _paths(app.routes))

    def engine_() -> Engine:
        if live.engine is None:
            raise NotReady("the model and memory are loading")
        return live.engine

    @app.exception_handler(GenerationError)
    async def failed(_: Request, exc: GenerationError) -> JSONResponse:
        return error(500, str(exc), kind="server_error")

    @app.exception_handler(InvalidRequest)
    async def refused(_: Request, exc: InvalidRequest) -> JSONResponse:
        return error(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """A query or header parameter FastAPI checked (the edit API's): 400 in OpenAI's format."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", where)

    @app.exception_handler(NotReady)
    async def loading(_: Request, exc: NotReady) -> JSONResponse:
        return error(503, str(exc), kind="server_error", code="loading", headers={"Retry-After": "1"})

    @app.exception_handler(asyncio.TimeoutError)
    async def timed_out(_: Request, exc: asyncio.TimeoutError) -> JSONResponse:
        return error(504, f"the request did not finish within {limits.request_timeout:g} s", kind="timeout_error",
                     code="timeout")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the process works (loading, or serving, even a stale memory);
        `following` false and `lag_s` when the server cannot read the ledger."""
        engine = live.engine
        if engine is None:
            return JSONResponse({"status": "loading", "following": False})
        served, follower = engine.served, live.follower
        snapshot = served.snapshot
        ok = engine.alive
        health = follower.health() if follower is not None else {"following": False, "lag_s": None, "error": None}
        return JSONResponse({"status": "ok" if ok else "down", "name": snapshot.name, "seq": snapshot.seq,
                             "version": snapshot.version, "pinned": served.pinned, **health,
                             "notices": bool(follower is not None and follower.listening)},
                            status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 503 until the model and memory are loaded (and if the engine stopped)."""
        engine = live.engine
        if engine is None or not engine.alive:
            return JSONResponse({"status": "loading" if engine is None else "down"}, status_code=503)
        return JSONResponse({"status": "ready", "seq": engine.served.seq, "version": engine.served.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics (serving/metrics.py)."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/memory")
    async def memory() -> dict[str, Any]:
        engine = engine_()
        return {**engine.served.describe(), "reloads": engine.reloads,
                "notices": live.follower.notices if live.follower is not None else 0}

    app.include_router(openai_routes(engine_, limits))
    if edits is not None:
        app.include_router(edit_routes(edits, lambda: engine_().served.store))

    def openapi() -> dict[str, Any]:
        """FastAPI's document without its 422 answers: `invalid` above makes them 400s."""
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            for operation in (op for path in document.get("paths", {}).values() for op in path.values()):
                if "400" in operation.get("responses", {}):
                    operation["responses"].pop("422", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["create_app"]
