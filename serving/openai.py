"""The OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true` as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`) and
`GET /v1/models`.

Extensions to the OpenAI body: `use_memory` (default true; false answers with the base model)
and `ignore_eos` (as in vLLM: generate exactly `max_tokens`, e.g. to benchmark). Each response
names the snapshot it was generated with (`system_fingerprint` and the `memoir` field: seq,
version, and the edits each prompt retrieved).
Defaults differ from OpenAI's where an edit service needs it: `temperature` 0 (greedy) and
`max_tokens` 16.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from serving.engine import Engine, GenerationError, InvalidRequest, Row, Sampling, Work
from serving.http import Limits
from store.snapshots import Snapshot

MAX_PROMPTS = 64  # per request: a request's prompts share one batch (and one snapshot)


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



def openai_routes(engine_: Callable[[], Engine], limits: Limits) -> APIRouter:
    """The routes, answering with the engine `engine_()` returns (NotReady while loading)."""
    router = APIRouter()

    @router.get("/v1/models")
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

    @router.post("/v1/completions")
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

    @router.post("/v1/chat/completions")
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

    return router
