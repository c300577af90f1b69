"""The HTTP endpoint (FastAPI): OpenAI-style completions and chat completions over a served model.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`,
`GET /v1/memory` (the snapshot served: seq, version, live edits, config), `GET /metrics`
(Prometheus, workers/metrics.py), `GET /healthz`
(liveness; `following` and `lag_s` say whether the ledger is being read) and `GET /readyz`
(503 until the model and memory are loaded).

Bounded (`Limits`): a request body of at most `max_body_bytes` (413), sent within
`request_timeout` (408); at most `max_queue` requests admitted at once (503 with Retry-After);
each answered within `request_timeout` (504, its generation stopped). Parsing, tokenisation and
length checks run on worker threads: the event loop only moves bytes.

One generation thread (`Engine`) owns the model. Requests wait in a small queue; the thread
takes the oldest, waits `batch_wait` seconds for more with the same sampling settings and runs
them as one batch of up to `max_batch` sequences (a request's prompts always share a batch).
Retrieval is decided per sequence at prefill. New memory snapshots (from `Follower`) are
installed only between batches, so each request sees one snapshot, named in its response
(`system_fingerprint` and the `memoir` field: seq, version, and the edits each prompt retrieved).

Extensions to the OpenAI body: `use_memory` (default true; false answers with the base model)
and `ignore_eos` (as in vLLM: generate exactly `max_tokens`, e.g. to benchmark).
Defaults differ from OpenAI's where an edit service needs it: `temperature` 0 (greedy) and
`max_tokens` 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from transformers import StoppingCriteria, StoppingCriteriaList

from memoir import MemoryState
from store.snapshots import Snapshot
from workers.metrics import RequestMetrics, ServerMetrics
from workers.serving import ServedModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT = 0.005
DEFAULT_MAX_TOKENS_LIMIT = 512
MAX_PROMPTS = 64  # per request: a request's prompts share one batch (and one snapshot)
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT = 120.0


class InvalidRequest(ValueError):
    """A request the endpoint refuses (HTTP 400), naming the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(RuntimeError):
    """The model failed on a batch (HTTP 500); the server goes on."""


# -- request bodies -----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    use_memory: bool = True
    ignore_eos: bool = False

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidRequest("stop: up to 4 non-empty strings", "stop")
        return tuple(stops)


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content) or not all(isinstance(p, str) for p in parts):
            raise InvalidRequest("messages: only text content is supported", "messages")
        return "".join(parts)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


BodyT = TypeVar("BodyT", bound=_Body)


# -- the generation thread ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Settings a batch shares."""

    temperature: float
    top_p: float
    seed: int | None
    use_memory: bool
    ignore_eos: bool


@dataclass
class Row:
    """One prompt of a request and what it has generated so far."""

    index: int
    ids: list[int]
    max_tokens: int
    stops: tuple[str, ...]
    lstrip: bool  # chat content starts at its first non-space character
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` streamed so far
    finish_reason: str | None = None
    retrieved: list[int] = field(default_factory=list)

    def visible(self, tokenizer: Any) -> str:
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def add(self, token: int, eos: set[int], tokenizer: Any) -> None:
        """Take one generated token; set `finish_reason` when the row is done."""
        if token in eos:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        self.text = self.visible(tokenizer)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = self.text[:cut], "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"

    def fresh_text(self) -> str:
        """Text not streamed yet that can no longer change: an unfinished character (U+FFFD from a
        partial UTF-8 sequence) or the start of a stop string is held back until it resolves."""
        end = len(self.text)
        if self.finish_reason is None:
            end = len(self.text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.sent, min(end, len(self.text) - hold))
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


class Work:
    """One HTTP request in the engine: its rows, sampling settings and a channel back to the
    event loop. Events: ("text", index, str), ("done", index, Row), ("error", None, message)."""

    def __init__(self, rows: list[Row], sampling: Sampling, stream: bool, loop: asyncio.AbstractEventLoop,
                 request_id: str = "") -> None:
        self.request_id = request_id
        self.rows = rows
        self.sampling = sampling
        self.stream = stream
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.snapshot: Snapshot | None = None
        self.cancelled = False
        self.enqueued = time.perf_counter()

    def send(self, kind: str, index: int | None, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, index, payload))


class _Feed(StoppingCriteria):
    """Called by `generate` after each token: feeds the rows, streams their text, and stops the
    rows that are done (EOS, max_tokens, a stop string, a client that left)."""

    def __init__(self, rows: list[tuple[Work, Row]], served: ServedModel, eos: set[int]) -> None:
        self.rows = rows
        self.served = served
        self.eos = eos
        self.first = True

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first:  # the prefill decided each sequence's edit
            self.first = False
            retrieved = self.served.editor.memory.retrieved_edits()
            for n, (_, row) in enumerate(self.rows):
                row.retrieved = retrieved[n] if n < len(retrieved) else []
        tokens = input_ids[:, -1].tolist()
        done = []
        for (work, row), token in zip(self.rows, tokens):
            if row.finish_reason is None:
                if work.cancelled:
                    row.finish_reason = "cancelled"
                else:
                    row.add(token, self.eos, self.served.tokenizer)
                    if work.stream and (text := row.fresh_text()):
                        work.send("text", row.index, text)
                if row.finish_reason is not None:
                    work.send("done", row.index, row)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The one thread that runs the model: batches requests, installs new snapshots between batches."""

    def __init__(self, served: ServedModel, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait: float = DEFAULT_BATCH_WAIT, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.served = served
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.max_tokens_limit = max_tokens_limit
        self.context = int(getattr(served.model.config, "max_position_embeddings", 0) or 0)
        self.eos = served.editor.stop_ids()
        self.batches = 0
        self.reloads = 0
        self.metrics = ServerMetrics()  # create_app puts the app's here
        self._inbox: queue.Queue[Work | None] = queue.Queue()
        self._waiting: deque[Work] = deque()
        self._next: tuple[Snapshot, MemoryState] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memoir-engine", daemon=True)

    # -- used by other threads -----------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def offer(self, snapshot: Snapshot, state: MemoryState) -> None:
        """A newer snapshot, installed before the next batch (a later offer replaces an earlier one)."""
        with self._lock:
            self._next = (snapshot, state)
        self._inbox.put(None)  # wake the thread if idle

    def submit(self, work: Work) -> None:
        self._inbox.put(work)

    def check(self, row: Row) -> None:
        if row.max_tokens > self.max_tokens_limit:
            raise InvalidRequest(f"max_tokens: at most {self.max_tokens_limit}", "max_tokens")
        if not row.ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if self.context and len(row.ids) + row.max_tokens > self.context:
            raise InvalidRequest(f"the prompt ({len(row.ids)} tokens) and max_tokens ({row.max_tokens}) exceed "
                                 f"the model's context of {self.context} tokens", "max_tokens")

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._install()
            batch = self._next_batch()
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the server
                log.exception("generation failed")
                for work in batch:
                    work.send("error", None, f"generation failed: {type(exc).__name__}")

    def _install(self) -> None:
        with self._lock:
            loaded, self._next = self._next, None
        if loaded is not None:
            try:
                self.served.install(*loaded)
                self.reloads += 1
            except Exception:  # noqa: BLE001 - keep serving the snapshot we have
                log.exception("could not install memory snapshot seq %d", loaded[0].seq)

    def _take(self, timeout: float | None) -> bool:
        """Move one arrival from the inbox to the waiting line; False on timeout or a wake-up."""
        try:
            work = self._inbox.get(timeout=timeout) if timeout is None or timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return False
        if work is None:
            return False
        self._waiting.append(work)
        return True

    def _next_batch(self) -> list[Work]:
        """The oldest request and, after `batch_wait`, the waiting ones with the same settings."""
        if not self._waiting and not self._take(timeout=None):
            return []
        deadline = time.monotonic() + self.batch_wait
        while True:
            head = self._waiting[0].sampling
            rows = sum(len(w.rows) for w in self._waiting if w.sampling == head)
            left = deadline - time.monotonic()
            if rows >= self.max_batch or left <= 0:
                break
            self._take(timeout=left)
            if self._stop.is_set():
                return []
        batch, rest, size = [], deque(), 0
        for work in self._waiting:
            if work.sampling == head and (not batch or size + len(work.rows) <= self.max_batch):
                batch.append(work)
                size += len(work.rows)
            else:
                rest.append(work)
        self._waiting = rest
        return batch

    def _generate(self, batch: list[Work]) -> None:
        rows = [(work, row) for work in batch if not work.cancelled for row in work.rows]
        if not rows:
            return
        served, sampling = self.served, batch[0].sampling
        for work in batch:
            work.snapshot = served.snapshot
        tokens = served.batch([row.ids for _, row in rows])
        memory = served.editor.memory
        options: dict[str, Any] = {"do_sample": False}
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        if sampling.ignore_eos:
            options["min_new_tokens"] = max(row.max_tokens for _, row in rows)
        previous = memory.enabled
        memory.enabled = sampling.use_memory
        try:
            with torch.no_grad():
                served.model.generate(
                    input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    max_new_tokens=max(row.max_tokens for _, row in rows), use_cache=True,
                    pad_token_id=served.editor.codec.pad_id,
                    stopping_criteria=StoppingCriteriaList([_Feed(rows, served, self.eos)]), **options)
        finally:
            memory.enabled = previous
        self.batches += 1
        for work, row in rows:
            if row.finish_reason is None:  # generate stopped at the batch's longest max_tokens
                row.finish_reason = "length"
                if work.stream and (text := row.fresh_text()):
                    work.send("text", row.index, text)
                work.send("done", row.index, row)
        self.metrics.batch([row for _, row in rows], sampling.use_memory)
        for work in batch:
            log.info("request %s: %d prompts, %d tokens, memory seq %d, retrieved %s", work.request_id,
                     len(work.rows), sum(len(r.tokens) for r in work.rows), served.seq,
                     [r.retrieved for r in work.rows], extra={"request_id": work.request_id})


# -- the HTTP app -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server: its body, its time, and a place in line."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE  # requests admitted at once (tokenising, waiting or generating)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds, from the first byte to the last


class NotReady(RuntimeError):
    """The model and memory are still loading (HTTP 503)."""


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Bounds:
    """ASGI middleware in front of the app, for POST requests: reads the body within the request
    timeout (408) and up to `max_body_bytes` (413; a larger body is read on to a bound and thrown
    away, so the client gets the answer), then admits at most `max_queue` requests at once (503 with
    Retry-After); each admitted request carries its deadline (`scope["state"]["deadline"]`) and
    holds its place until its response, streamed or not, has been sent."""

    DRAIN_FACTOR = 16  # a body past the limit is drained up to this many times it, then cut off

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self.admitted = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        deadline = time.monotonic() + limits.request_timeout
        try:
            body = await asyncio.wait_for(self._read(scope, receive), limits.request_timeout)
        except asyncio.TimeoutError:
            response = _error(408, f"the request body did not arrive within {limits.request_timeout:g} s",
                              code="request_timeout", headers={"Connection": "close"})
        except OverflowError:
            response = _error(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                              code="request_too_large", headers={"Connection": "close"})
        except ConnectionError:
            return  # the client left
        else:
            if self.admitted >= limits.max_queue:
                response = _error(503, f"the server is busy ({self.admitted} requests in progress); retry later",
                                  kind="server_error", code="overloaded", headers={"Retry-After": "1"})
            else:
                self.admitted += 1
                scope.setdefault("state", {})["deadline"] = deadline
                try:
                    await self.app(scope, self._replay(body, receive), send)
                finally:
                    self.admitted -= 1
                return
        await response(scope, receive, send)

    async def _read(self, scope: dict[str, Any], receive: Any) -> bytes:
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit * self.DRAIN_FACTOR:
            raise OverflowError
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * self.DRAIN_FACTOR:
                raise OverflowError
            if not message.get("more_body", False):
                break
        if size > limit:
            raise OverflowError
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        return replay


def _fingerprint(snapshot: Snapshot) -> str:
    return f"memoir-{snapshot.name}-seq{snapshot.seq}-v{snapshot.version}"


def _memoir_field(work: Work, rows: list[Row]) -> dict[str, Any]:
    assert work.snapshot is not None
    return {"name": work.snapshot.name, "seq": work.snapshot.seq, "version": work.snapshot.version,
            "use_memory": work.sampling.use_memory, "retrieved": [row.retrieved for row in rows]}


def _usage(rows: list[Row]) -> dict[str, int]:
    prompt = sum(len(r.ids) for r in rows)
    completion = sum(len(r.tokens) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _parse(model: type[BodyT], raw: bytes) -> BodyT:
    """A request body, validated (InvalidRequest naming the first bad field)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None) from None


def create_app(start: Callable[[], tuple[Engine, Any]], limits: Limits = Limits(), on_ready: Any = None,
               on_failure: Any = None) -> FastAPI:
    """The FastAPI app. It answers at once; `start()` (the model and memory loading: (engine,
    follower or None)) runs on a thread, and the engine and follower are started when it returns.
    Until then `/healthz` says "loading" and `/readyz` and the API answer 503. `on_ready()` is
    called once serving, `on_failure(exc)` if `start()` fails. Both are stopped with the app."""
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
    app.add_middleware(RequestMetrics, metrics=metrics,  # outermost: counts Bounds' answers too
                       routes=lambda: {getattr(r, "path", None) for r in app.routes})

    def engine_() -> Engine:
        if live.engine is None:
            raise NotReady("the model and memory are loading")
        return live.engine

    @app.exception_handler(GenerationError)
    async def failed(_: Request, exc: GenerationError) -> JSONResponse:
        return _error(500, str(exc), kind="server_error")

    @app.exception_handler(InvalidRequest)
    async def refused(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, str(exc), exc.param)

    @app.exception_handler(NotReady)
    async def loading(_: Request, exc: NotReady) -> JSONResponse:
        return _error(503, str(exc), kind="server_error", code="loading", headers={"Retry-After": "1"})

    @app.exception_handler(asyncio.TimeoutError)
    async def timed_out(_: Request, exc: asyncio.TimeoutError) -> JSONResponse:
        return _error(504, f"the request did not finish within {limits.request_timeout:g} s", kind="timeout_error",
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
        """Prometheus metrics (workers/metrics.py)."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/memory")
    async def memory() -> dict[str, Any]:
        engine = engine_()
        return {**engine.served.describe(), "reloads": engine.reloads,
                "notices": live.follower.notices if live.follower is not None else 0}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine_().served.model_id, "object": "model", "created": 0,
                                            "owned_by": "memoir"}]}

    def remaining(request: Request) -> float:
        return max(0.0, request.state.deadline - time.monotonic())

    async def prepare(request: Request, build: Callable[[Engine, bytes], tuple[_Body, list[Row]]],
                      kind: str) -> tuple[Engine, _Body, Work]:
        """Parse, tokenise and check the request on a worker thread (never on the event loop), then
        queue it with a new request id `<kind>-<hex>`."""
        engine = engine_()
        raw = await request.body()
        body, rows = await asyncio.wait_for(run_in_threadpool(build, engine, raw), remaining(request))
        sampling = Sampling(body.temperature, body.top_p, body.seed, body.use_memory, body.ignore_eos)
        work = Work(rows, sampling, body.stream, asyncio.get_running_loop(), f"{kind}-{uuid.uuid4().hex}")
        engine.submit(work)
        return engine, body, work

    async def finished(work: Work, request: Request) -> list[Row]:
        done: dict[int, Row] = {}
        try:
            async with asyncio.timeout(remaining(request)):
                while len(done) < len(work.rows):
                    kind, index, payload = await work.events.get()
                    if kind == "error":
                        raise GenerationError(payload)
                    if kind == "done":
                        done[index] = payload
        finally:
            work.cancelled = len(done) < len(work.rows)
        return [done[i] for i in range(len(work.rows))]

    def sse(work: Work, request: Request, chunk: Any, usage: bool) -> StreamingResponse:
        """`chunk(rows_or_None, index, text, finish_reason)` -> one OpenAI chunk."""

        async def events() -> AsyncIterator[str]:
            done, started = 0, False
            try:
                while done < len(work.rows):
                    try:
                        kind, index, payload = await asyncio.wait_for(work.events.get(), remaining(request))
                    except asyncio.TimeoutError:
                        kind, payload = "error", f"the request did not finish within {limits.request_timeout:g} s"
                    if not started:  # the engine has set the snapshot before its first event
                        started = True
                        for row in work.rows:
                            if work.snapshot is not None and (first := chunk(row.index, None, None)) is not None:
                                yield f"data: {json.dumps(first)}\n\n"
                    if kind == "error":
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        return
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(index, payload, None))}\n\n"
                    else:
                        done += 1
                        yield f"data: {json.dumps(chunk(index, '', payload.finish_reason))}\n\n"
                if usage:
                    yield f"data: {json.dumps({**chunk(0, '', None), 'choices': [], 'usage': _usage(work.rows)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                work.cancelled = done < len(work.rows)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def header(engine: Engine, work: Work, kind: str, request_id: str) -> dict[str, Any]:
        snapshot = work.snapshot or engine.served.snapshot
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": engine.served.model_id,
                "system_fingerprint": _fingerprint(snapshot)}

    def completion_rows(engine: Engine, raw: bytes) -> tuple[CompletionBody, list[Row]]:
        body = _parse(CompletionBody, raw)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise InvalidRequest(f"prompt: 1 to {MAX_PROMPTS} prompts", "prompt")
        stops = body.stops()
        rows = [Row(n, engine.served.prompt_ids(p) if p.strip() else [], body.max_tokens, stops, lstrip=False)
                for n, p in enumerate(prompts)]
        for row in rows:
            engine.check(row)
        return body, rows

    def chat_rows(engine: Engine, raw: bytes) -> tuple[ChatBody, list[Row]]:
        body = _parse(ChatBody, raw)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise InvalidRequest("messages: all empty", "messages")
        row = Row(0, engine.served.chat_ids(messages), body.limit(), body.stops(), lstrip=True)
        engine.check(row)
        return body, [row]

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        engine, body, work = await prepare(request, completion_rows, "cmpl")
        request_id = work.request_id
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any] | None:
                if text is None:
                    return None
                out = {**header(engine, work, "text_completion", request_id),
                       "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
                if finish is not None:
                    out["memoir"] = _memoir_field(work, [work.rows[index]])
                return out

            return sse(work, request, chunk, bool((body.stream_options or {}).get("include_usage")))
        done = await finished(work, request)
        return {**header(engine, work, "text_completion", request_id),
                "choices": [{"index": r.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                            for r in done],
                "usage": _usage(done), "memoir": _memoir_field(work, done)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        engine, body, work = await prepare(request, chat_rows, "chatcmpl")
        request_id = work.request_id
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                out = {**header(engine, work, "chat.completion.chunk", request_id),
                       "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if finish is not None:
                    out["memoir"] = _memoir_field(work, [work.rows[index]])
                return out

            return sse(work, request, chunk, bool((body.stream_options or {}).get("include_usage")))
        done = await finished(work, request)
        return {**header(engine, work, "chat.completion", request_id),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done[0].text},
                             "logprobs": None, "finish_reason": done[0].finish_reason}],
                "usage": _usage(done), "memoir": _memoir_field(work, done)}

    return app


__all__ = ["ChatBody", "CompletionBody", "Engine", "InvalidRequest", "Limits", "create_app"]
