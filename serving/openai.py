"""The OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`"stream": true` as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
`GET /v1/models` and `GET /v1/models/{id}`.

The model is the memory: its id is the memory's name, and a request naming another model gets
404 (`model_not_found`); a request naming none is answered by the memory served.

What is implemented: text, list-of-text and token-id prompts (`list[int]`, `list[list[int]]`,
used as given: no BOS, no template), `max_tokens` (0 with `echo`: score the prompt only),
`temperature`, `top_p`, `seed`, `n`, `stop` (a string or up to `MAX_STOPS` strings), `echo`,
`logprobs` (completions: up to `MAX_LOGPROBS` alternatives; chat: `logprobs` + `top_logprobs`),
`stream` with `stream_options.include_usage`, `user` (accepted, unused). Parameters the server
does not implement are refused with 400 naming them, unless they hold their neutral value
(`presence_penalty: 0`, `logit_bias: {}`, `response_format: {"type": "text"}`, `tools: []`, ...):
nothing is silently dropped.

Log-probabilities are the served model's own (memory applied exactly as in generation: retrieval
decided from the whole prompt at prefill), before temperature and top_p. Completions list every
generated token, the one that ended the answer (EOS) included, as vLLM does; with `echo` the
prompt's tokens come first, the first one with a null log-probability. `text_offset` counts the
characters of the token strings before each token (with `echo`, the generated tokens start at the
end of the echoed prompt text).

Extensions to the OpenAI body: `use_memory` (default true; false answers with the base model)
and `ignore_eos` (as in vLLM: generate exactly `max_tokens`, e.g. to benchmark). Each response
names the snapshot it was generated with (`system_fingerprint` and the `memoir` field: seq,
version, and the edits each choice's prompt retrieved).
Defaults differ from OpenAI's where an edit service needs it: `temperature` 0 (greedy). A
completion's `max_tokens` defaults to 16 (as OpenAI's); a chat answer without `max_tokens`
runs to the end of the context, at most the server's `--max-tokens`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from serving.engine import Engine, GenerationError, InvalidRequest, Row, Sampling, Score, Work
from serving.http import Limits, error
from store.snapshots import Snapshot

MAX_PROMPTS = 64  # choices per request (prompts × n): a request's rows share one batch (and one snapshot)
MAX_STOPS = 16  # OpenAI allows 4; lm-evaluation-harness may send more
MAX_LOGPROBS = 20  # OpenAI allows 5 (completions) and 20 (chat top_logprobs)

# OpenAI parameters this server does not implement, with the values that ask for nothing (accepted).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


class ModelNotFound(InvalidRequest):
    """A request naming a model this server does not serve (HTTP 404)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest is checked by `_refuse_unsupported`

    model: str | None = None
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(1, ge=1, le=MAX_PROMPTS)
    seed: int | None = None
    user: str | None = None
    use_memory: bool = True
    ignore_eos: bool = False

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise InvalidRequest(f"stop: a string or up to {MAX_STOPS} strings, none empty", "stop")
        return tuple(stops)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature or 0.0, self.top_p or 1.0, self.seed, self.use_memory, self.ignore_eos)

    @property
    def copies(self) -> int:
        return self.n or 1

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

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
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


BodyT = TypeVar("BodyT", bound=_Body)


def _fingerprint(snapshot: Snapshot) -> str:
    return f"memoir-{snapshot.name}-seq{snapshot.seq}-v{snapshot.version}"


def _memoir_field(work: Work, rows: list[Row]) -> dict[str, Any]:
    assert work.snapshot is not None
    return {"name": work.snapshot.name, "seq": work.snapshot.seq, "version": work.snapshot.version,
            "use_memory": work.sampling.use_memory, "retrieved": [row.retrieved for row in rows]}


def _usage(rows: list[Row], copies: int = 1) -> dict[str, int]:
    prompt = sum(len(r.ids) for r in rows if r.index % copies == 0)  # each prompt once, whatever n
    completion = sum(len(r.tokens) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _refuse_unsupported(model: type[BodyT], data: dict[str, Any]) -> None:
    """400 naming every parameter the server does not implement (unknown, or a known one that asks
    for something: a penalty, a bias, tools, a response format)."""
    known = set(model.model_fields)
    bad = sorted(key for key, value in data.items()
                 if key not in known and (key not in NEUTRAL or value not in NEUTRAL[key]))
    if bad:
        them = "them" if len(bad) > 1 else "it"
        raise InvalidRequest(f"unsupported parameter{'s' if len(bad) > 1 else ''}: {', '.join(bad)} (this server does "
                             f"not implement {them}; see the README, OpenAI compatibility)", bad[0])


def _parse(model: type[BodyT], raw: bytes) -> BodyT:
    """A request body, validated (InvalidRequest naming the first bad field or the unsupported ones)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest("body: not valid JSON", None) from None
    if not isinstance(data, dict):
        raise InvalidRequest("body: a JSON object is expected", None)
    _refuse_unsupported(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None) from None


def _check_model(engine: Engine, body: _Body) -> None:
    name = engine.served.name
    if body.model is not None and body.model != name:
        raise ModelNotFound(f"the model {body.model!r} does not exist: this server serves memory {name!r}", "model")


def _token_text(tokenizer: Any, cache: dict[int, str], token: int) -> str:
    if token not in cache:
        cache[token] = tokenizer.decode([token], skip_special_tokens=False)
    return cache[token]


def completion_logprobs(tokenizer: Any, scores: list[Score], start: int = 0) -> dict[str, Any]:
    """OpenAI's completion `logprobs` object for `scores` (prompt and/or generated tokens): token
    strings, their log-probabilities (null for a prompt's first token), the `top` alternatives as a
    {token: logprob} dict holding the token itself too (as vLLM does), and text offsets from `start`."""
    cache: dict[int, str] = {}
    tokens, offsets, top = [], [], []
    offset = start
    for score in scores:
        text = _token_text(tokenizer, cache, score.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if score.logprob is None:
            top.append(None)
        else:
            best = {_token_text(tokenizer, cache, t): lp for t, lp in score.top}
            best.setdefault(text, score.logprob)
            top.append(best)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, scores: list[Score]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: one entry per token of the answer (EOS left out)."""
    cache: dict[int, str] = {}

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, cache, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scores if s.logprob is not None], "refusal": None}


def openai_routes(engine_: Callable[[], Engine], limits: Limits) -> APIRouter:
    """The routes, answering with the engine `engine_()` returns (NotReady while loading)."""
    router = APIRouter()

    def card(engine: Engine) -> dict[str, Any]:
        return {"id": engine.served.name, "object": "model", "created": 0, "owned_by": "memoir",
                "memoir": {"model": engine.served.model_id, "seq": engine.served.seq,
                           "version": engine.served.version}}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(engine_())]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        engine = engine_()
        if model_id != engine.served.name:
            return error(404, f"the model {model_id!r} does not exist: this server serves memory "
                              f"{engine.served.name!r}", "model", code="model_not_found")
        return card(engine)

    def remaining(request: Request) -> float:
        return max(0.0, request.state.deadline - time.monotonic())

    async def prepare(request: Request, build: Callable[[Engine, bytes], tuple[_Body, list[Row]]],
                      kind: str) -> tuple[Engine, _Body, Work]:
        """Parse, tokenise and check the request on a worker thread (never on the event loop), then
        queue it with a new request id `<kind>-<hex>`."""
        engine = engine_()
        raw = await request.body()
        body, rows = await asyncio.wait_for(run_in_threadpool(build, engine, raw), remaining(request))
        work = Work(rows, body.sampling(), bool(body.stream), asyncio.get_running_loop(),
                    f"{kind}-{uuid.uuid4().hex}")
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
        return [done[row.index] for row in work.rows]

    def sse(work: Work, request: Request, chunk: Any, usage: bool, copies: int) -> StreamingResponse:
        """`chunk(index, text_or_None, finish_reason)` -> one OpenAI chunk (None: nothing to send)."""

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
                    last = {**chunk(0, '', None), "choices": [], "usage": _usage(work.rows, copies)}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                work.cancelled = done < len(work.rows)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def header(engine: Engine, work: Work, kind: str, request_id: str) -> dict[str, Any]:
        snapshot = work.snapshot or engine.served.snapshot
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": snapshot.name,
                "system_fingerprint": _fingerprint(snapshot)}

    def not_found(exc: ModelNotFound) -> JSONResponse:
        return error(404, str(exc), exc.param, code="model_not_found")

    def completion_rows(engine: Engine, raw: bytes) -> tuple[CompletionBody, list[Row]]:
        body = _parse(CompletionBody, raw)
        _check_model(engine, body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not 1 <= len(prompts) * body.copies <= MAX_PROMPTS:
            raise InvalidRequest(f"prompt: 1 to {MAX_PROMPTS} prompts (times n)", "prompt")
        if body.max_tokens == 0 and not body.echo:
            raise InvalidRequest("max_tokens: 0 asks for nothing unless echo is true", "max_tokens")
        if body.stream and body.logprobs is not None:
            raise InvalidRequest("logprobs: not available with stream", "logprobs")
        stops = body.stops()
        limit = 16 if body.max_tokens is None else body.max_tokens
        rows = []
        for n, p in enumerate(prompts):
            ids = list(p) if not isinstance(p, str) else engine.served.prompt_ids(p) if p.strip() else []
            for copy in range(body.copies):
                rows.append(Row(n * body.copies + copy, ids, limit, stops, lstrip=False, logprobs=body.logprobs,
                                score_prompt=bool(body.echo) and body.logprobs is not None))
        for row in rows[:: body.copies]:
            engine.check(row)
        return body, rows

    def chat_rows(engine: Engine, raw: bytes) -> tuple[ChatBody, list[Row]]:
        body = _parse(ChatBody, raw)
        _check_model(engine, body)
        if body.stream and body.logprobs:
            raise InvalidRequest("logprobs: not available with stream", "logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs true", "top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise InvalidRequest("messages: all empty", "messages")
        ids = engine.served.chat_ids(messages)
        limit = body.limit()
        if limit is None:
            limit = engine.room(ids)
            if limit < 1:
                raise InvalidRequest(f"messages: the conversation ({len(ids)} tokens) leaves no room in the "
                                     f"model's context of {engine.context} tokens", "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        rows = [Row(k, ids, limit, body.stops(), lstrip=True, logprobs=logprobs) for k in range(body.copies)]
        engine.check(rows[0])
        return body, rows

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            engine, body, work = await prepare(request, completion_rows, "cmpl")
        except ModelNotFound as exc:
            return not_found(exc)
        request_id = work.request_id
        tokenizer = engine.served.tokenizer

        def echoed(row: Row) -> str:
            prompt = body.prompt
            if isinstance(prompt, str):
                return prompt
            if isinstance(prompt[0], str):
                return prompt[row.index // body.copies]
            return tokenizer.decode(row.ids)

        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any] | None:
                if text is None:
                    if not body.echo:
                        return None
                    text = echoed(work.rows[index])
                out = {**header(engine, work, "text_completion", request_id),
                       "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
                if finish is not None:
                    out["memoir"] = _memoir_field(work, [work.rows[index]])
                return out

            return sse(work, request, chunk, body.include_usage(), body.copies)
        done = await finished(work, request)

        def choices() -> list[dict[str, Any]]:
            out = []
            for row in done:
                head = echoed(row) if body.echo else ""
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(tokenizer, row.prompt_scores) if body.echo else None
                    tail = completion_logprobs(tokenizer, row.scores, len(head))
                    if logprobs is None:
                        logprobs = tail
                    else:
                        for key in logprobs:
                            logprobs[key] += tail[key]
                out.append({"index": row.index, "text": head + row.text, "logprobs": logprobs,
                            "finish_reason": row.finish_reason})
            return out

        return {**header(engine, work, "text_completion", request_id), "choices": await run_in_threadpool(choices),
                "usage": _usage(done, body.copies), "memoir": _memoir_field(work, done)}

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            engine, body, work = await prepare(request, chat_rows, "chatcmpl")
        except ModelNotFound as exc:
            return not_found(exc)
        request_id = work.request_id
        tokenizer = engine.served.tokenizer
        if body.stream:
            def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                out = {**header(engine, work, "chat.completion.chunk", request_id),
                       "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if finish is not None:
                    out["memoir"] = _memoir_field(work, [work.rows[index]])
                return out

            return sse(work, request, chunk, body.include_usage(), body.copies)
        done = await finished(work, request)

        def choices() -> list[dict[str, Any]]:
            return [{"index": row.index, "message": {"role": "assistant", "content": row.text},
                     "logprobs": chat_logprobs(tokenizer, row.scores[: len(row.tokens)]) if body.logprobs else None,
                     "finish_reason": row.finish_reason} for row in done]

        return {**header(engine, work, "chat.completion", request_id), "choices": await run_in_threadpool(choices),
                "usage": _usage(done, body.copies), "memoir": _memoir_field(work, done)}

    return router
