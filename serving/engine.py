"""The generation engine: one thread owns the model and runs requests in batches.

Requests (`Work`, one `Row` per prompt) wait in a small queue; the thread takes the oldest, waits
`batch_wait` seconds for more with the same sampling settings and runs them as one batch of up to
`max_batch` sequences (a request's prompts always share a batch). Retrieval is decided per
sequence at prefill. New memory snapshots (from `serving.follower.Follower`) are installed only
between batches, so each request sees one snapshot. Text goes back to the event loop through
each request's channel as it is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from memoir import MemoryState
from serving.metrics import ServerMetrics
from serving.model import ServedModel
from store.snapshots import Snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT = 0.005
DEFAULT_MAX_TOKENS_LIMIT = 512


class InvalidRequest(ValueError):
    """A request the endpoint refuses (HTTP 400), naming the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(RuntimeError):
    """The model failed on a batch (HTTP 500); the server goes on."""


@dataclass(frozen=True)
class Sampling:
    """Settings a batch shares."""

    temperature: float
    top_p: float
    seed: int | None
    use_memory: bool
    ignore_eos: bool


@dataclass(frozen=True)
class Score:
    """One token's log-probability under the served model (memory applied as in generation) and the
    `top` most likely tokens at its position, as (token id, log-probability) pairs, best first.
    `logprob` is None for a prompt's first token, which nothing predicts."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def _scores(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[Score]:
    """Score objects for `tokens`, each read from the matching row of `logprobs` (n, vocab)."""
    if not tokens:
        return []
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None]).squeeze(-1).tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        best = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [()] * len(tokens)
    return [Score(t, lp, b) for t, lp, b in zip(tokens, chosen, best)]


@dataclass
class Row:
    """One prompt of a request and what it has generated so far."""

    index: int
    ids: list[int]
    max_tokens: int
    stops: tuple[str, ...]
    lstrip: bool  # chat content starts at its first non-space character
    logprobs: int | None = None  # record each token's log-probability and this many top alternatives
    score_prompt: bool = False  # also the prompt's tokens (`echo` with `logprobs`): one forward pass
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` streamed so far
    finish_reason: str | None = None
    retrieved: list[int] = field(default_factory=list)
    prompt_scores: list[Score] = field(default_factory=list)  # one per prompt token (the first: no logprob)
    scores: list[Score] = field(default_factory=list)  # one per generated token, EOS included

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


class _Record(LogitsProcessor):
    """Keeps the log-probabilities of each step's next token (the model's own distribution, before
    temperature and top_p) for `_Feed` to read once the token is chosen."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = scores.float().log_softmax(-1)
        return scores


class _Feed(StoppingCriteria):
    """Called by `generate` after each token: feeds the rows, streams their text, and stops the
    rows that are done (EOS, max_tokens, a stop string, a client that left)."""

    def __init__(self, rows: list[tuple[Work, Row]], served: ServedModel, eos: set[int],
                 record: _Record | None = None) -> None:
        self.rows = rows
        self.served = served
        self.eos = eos
        self.record = record
        self.first = True

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.first:  # the prefill decided each sequence's edit
            self.first = False
            retrieved = self.served.editor.memory.retrieved_edits()
            for n, (_, row) in enumerate(self.rows):
                row.retrieved = retrieved[n] if n < len(retrieved) else []
        tokens = input_ids[:, -1].tolist()
        done = []
        for n, ((work, row), token) in enumerate(zip(self.rows, tokens)):
            if row.finish_reason is None:
                if work.cancelled:
                    row.finish_reason = "cancelled"
                else:
                    if row.logprobs is not None and self.record is not None and self.record.last is not None:
                        row.scores += _scores(self.record.last[n : n + 1], [token], row.logprobs)
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
        self.vocab = int(getattr(served.model.config, "vocab_size", 0) or 0)
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

    def room(self, ids: list[int]) -> int:
        """Tokens a prompt of `ids` may generate: to the end of the context, at most the server's cap."""
        left = self.context - len(ids) if self.context else self.max_tokens_limit
        return max(0, min(self.max_tokens_limit, left))

    def check(self, row: Row) -> None:
        if row.max_tokens > self.max_tokens_limit:
            raise InvalidRequest(f"max_tokens: at most {self.max_tokens_limit}", "max_tokens")
        if not row.ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.vocab
        if vocab and any(not 0 <= t < vocab for t in row.ids):
            raise InvalidRequest(f"prompt: token ids must lie in [0, {vocab})", "prompt")
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
        memory = served.editor.memory
        previous = memory.enabled
        memory.enabled = sampling.use_memory
        try:
            with torch.no_grad():
                scored = [(work, row) for work, row in rows if row.score_prompt or row.max_tokens == 0]
                if scored:
                    self._score(scored)
                for work, row in rows:
                    if row.max_tokens == 0:  # echo only: nothing to generate
                        row.finish_reason = "length"
                        work.send("done", row.index, row)
                live = [(work, row) for work, row in rows if row.max_tokens > 0]
                if live:
                    self._sample(live, sampling)
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

    def _score(self, rows: list[tuple[Work, Row]]) -> None:
        """One forward pass over the rows' prompts: each prompt token's log-probability (`echo` with
        `logprobs`) and the edit each prompt retrieves. Retrieval is decided exactly as at
        generation's prefill: from the prompt's own positions, memory on or off as the request says."""
        served = self.served
        tokens = served.batch([row.ids for _, row in rows])
        mask = tokens.attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate numbers positions
        logits = served.model(input_ids=tokens.input_ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).logits
        retrieved = served.editor.memory.retrieved_edits()
        width = tokens.input_ids.shape[1]
        for n, (_, row) in enumerate(rows):
            row.retrieved = retrieved[n] if n < len(retrieved) else []
            if row.score_prompt:
                start = width - len(row.ids)  # predictions of tokens 1.. are made at positions 0..
                logprobs = logits[n, start : width - 1].float().log_softmax(-1)
                row.prompt_scores = [Score(row.ids[0], None)] + _scores(logprobs, row.ids[1:], row.logprobs or 0)

    def _sample(self, rows: list[tuple[Work, Row]], sampling: Sampling) -> None:
        served = self.served
        tokens = served.batch([row.ids for _, row in rows])
        options: dict[str, Any] = {"do_sample": False}
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        if sampling.ignore_eos:
            options["min_new_tokens"] = max(row.max_tokens for _, row in rows)
        record = _Record() if any(row.logprobs is not None for _, row in rows) else None
        if record is not None:
            options["logits_processor"] = LogitsProcessorList([record])
        served.model.generate(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
            max_new_tokens=max(row.max_tokens for _, row in rows), use_cache=True,
            pad_token_id=served.editor.codec.pad_id,
            stopping_criteria=StoppingCriteriaList([_Feed(rows, served, self.eos, record)]), **options)


__all__ = ["Engine", "GenerationError", "InvalidRequest", "Row", "Sampling", "Score", "Work"]
