"""The producer's client: submit edits, wait for them, read their status, ask for rollbacks
and replays.

Small on purpose: it imports Celery and redis-py, never torch, and never reads the worker's
disk. The request id is the Celery task id and the idempotency key; the worker mirrors each
status change of a request into Redis (`memoir:status:<id>`), which is what `status` reads.

    from pipeline.client import submit
    handle = submit("Who wrote Hamlet?", "Christopher Marlowe", rephrases=["Hamlet's author?"])
    print(handle.wait(timeout=300))   # {'status': 'applied', 'edit_id': 7, 'seq': 7, 'scores': {...}, ...}

    # a correction: edit 7 is rolled back in the same queued operation that applies this one
    submit("Who wrote Hamlet?", "William Shakespeare", replaces=7).wait(timeout=300)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline import deadletter, settings
from pipeline.deadletter import UnknownDeadLetterError
from pipeline.schema import (
    DEFAULT_NAME,
    EditRequest,
    RequestError,
    check_name,
    validate_edit,
    validate_replay,
    validate_rollback,
)

if TYPE_CHECKING:
    import redis
    from celery import Celery

log = logging.getLogger(__name__)


class ConflictError(RequestError):
    """The request id was already submitted with a different payload."""

    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"{request_id!r} was already submitted with a different payload")
        self.request_id = request_id


class UnknownRequestError(LookupError):
    """No request with this id was ever submitted (or its key expired)."""


class BrokerError(RuntimeError):
    """Redis did not answer or refused an operation; nothing was half-sent."""


class WaitTimeout(TimeoutError):
    """`wait` ran out of time; `statuses` holds what was known then."""

    def __init__(self, message: str, statuses: dict[str, dict[str, Any]]) -> None:
        super().__init__(message)
        self.statuses = statuses


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def is_terminal(record: Mapping[str, Any] | None) -> bool:
    return record is not None and record.get("status") in settings.TERMINAL_STATUSES


class Handle:
    """A submitted request. `duplicate` is True when the id had been submitted before."""

    def __init__(self, client: "Client", request_id: str, name: str, duplicate: bool = False) -> None:
        self.client = client
        self.request_id = request_id
        self.name = name
        self.duplicate = duplicate

    def status(self) -> dict[str, Any]:
        return self.client.status(self.request_id)

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Block until the request is applied, failed or rolled back; return its status record."""
        return self.client.wait([self.request_id], timeout=timeout, poll=poll)[self.request_id]

    def __repr__(self) -> str:
        return f"Handle({self.request_id!r}, name={self.name!r}, duplicate={self.duplicate})"


class Client:
    """Talks to one Redis (default `MEMOIR_REDIS_URL`): the Celery broker and the status board."""

    def __init__(self, url: str | None = None, *, max_chars: int | None = None,
                 socket_timeout: float | None = None) -> None:
        self.url = url or settings.redis_url()
        self.max_chars = max_chars
        self.socket_timeout = socket_timeout  # seconds a Redis reply may take (None: no bound), e.g. in a server
        self._redis: "redis.Redis | None" = None
        self._app: "Celery | None" = None

    # -- connections -----------------------------------------------------------------------
    @property
    def redis(self) -> "redis.Redis":
        if self._redis is None:
            self._redis = settings.redis_client(self.url, socket_timeout=self.socket_timeout)
        return self._redis

    @property
    def app(self) -> "Celery":
        if self._app is None:
            self._app = settings.make_app(self.url)
        return self._app

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a Redis/Celery operation; connection trouble becomes a `BrokerError` (password hidden)."""
        import redis
        from kombu.exceptions import OperationalError

        try:
            return fn()
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise BrokerError(f"{what} failed at {settings.redact(self.url)}: {exc}") from None

    # -- submitting ------------------------------------------------------------------------
    def submit(self, prompt: object, target: object, *, rephrases: Sequence[object] | None = None,
               request_id: str | None = None, metadata: Mapping[str, Any] | None = None,
               name: str = DEFAULT_NAME, replaces: int | str | None = None) -> Handle:
        """Validate an edit and queue it on `memoir.<name>`. Raises `RequestError` before sending
        anything when a field is wrong, `ConflictError` when the id names another payload.

        `replaces` supersedes an edit: its ledger id, its request id, or "same-prompt" (the live
        edit with the same prompt). The worker applies this edit and rolls that one back in the
        same queued operation; when it names no live edit, this request fails and nothing changes.
        The final status record lists the rollbacks under `superseded`."""
        request = validate_edit(
            {"prompt": prompt, "target": target, "rephrases": rephrases, "request_id": request_id,
             "metadata": metadata, "name": name, "replaces": replaces},
            max_chars=self.max_chars,
        )
        return self.submit_request(request)

    def submit_request(self, request: EditRequest) -> Handle:
        """Queue an already validated request (see `submit`)."""
        return self._send(settings.APPLY_TASK, request.request_id, request.name, "edit",
                          request.payload_hash(), request.to_message())

    def rollback(self, edit: int | str, *, reason: str | None = None, exact: bool = False,
                 name: str = DEFAULT_NAME, request_id: str | None = None) -> Handle:
        """Queue the rollback of one edit (ledger id or request id) on its memory's queue, so it
        is ordered with the edits; the handle's status ends `done` or `failed`."""
        request = validate_rollback(edit, reason=reason, exact=exact, name=name, request_id=request_id)
        return self._send(settings.ROLLBACK_TASK, request.request_id, request.name, "rollback",
                          request.payload_hash(), request.to_message())

    def replay(self, *, from_seq: int = 1, mode: str = "retrain", name: str = DEFAULT_NAME,
               request_id: str | None = None) -> Handle:
        """Queue a rebuild of the memory from its ledger, checked against the stored and the live
        memory (it changes nothing); the status ends `done` (with `ok`, `live_ok`, ...) or `failed`."""
        request = validate_replay(from_seq=from_seq, mode=mode, name=name, request_id=request_id)
        return self._send(settings.REPLAY_TASK, request.request_id, request.name, "replay",
                          request.payload_hash(), request.to_message())

    def check_conflicts(self, requests: Iterable[EditRequest]) -> None:
        """Raise `ConflictError` if any id was submitted before with another payload (sends nothing)."""
        requests = list(requests)
        if not requests:
            return
        keys = [settings.request_key(r.request_id) for r in requests]
        claims = self._call("reading request ids", lambda: self.redis.mget(keys))
        for request, claim in zip(requests, claims):
            if claim is not None and not _same_claim(claim, request.name, request.payload_hash()):
                raise ConflictError(request.request_id)

    def _send(self, task: str, request_id: str, name: str, kind: str, digest: str,
              message: dict[str, Any]) -> Handle:
        """Claim the id (SET NX of name + payload hash), record `submitted`, send the task.

        A repeat of a claimed id with the same payload is not sent again once its first send
        went through (the claim is marked `sent`); if the first submit died before sending, the
        repeat sends it (the worker applies a request id at most once anyway).
        """
        key = settings.request_key(request_id)
        claim = f"{name} {digest}"
        ttl = settings.key_ttl()
        fresh = self._call("claiming the request id", lambda: self.redis.set(key, claim, nx=True, ex=ttl))
        if not fresh:
            existing = self._call("reading the request id", lambda: self.redis.get(key))
            if existing is None:  # expired in between: claim again
                return self._send(task, request_id, name, kind, digest, message)
            if not _same_claim(existing, name, digest):
                raise ConflictError(request_id)
            if existing.endswith(" sent"):
                log.info("request %s was already submitted: not sent again", request_id)
                return Handle(self, request_id, name, duplicate=True)
        record = {"request_id": request_id, "name": name, "kind": kind, "status": "submitted",
                  "updated_at": _now()}
        self._call("recording the request", lambda: self.redis.set(
            settings.status_key(request_id), settings.dumps(record), nx=True, ex=ttl))
        try:
            self._call("sending the request", lambda: self.app.send_task(
                task, kwargs={"request": message}, task_id=request_id, queue=settings.queue_name(name)))
        except BrokerError:
            if fresh:  # leave no claim behind for a request that never left
                try:
                    self.redis.delete(key, settings.status_key(request_id))
                except Exception:  # noqa: BLE001 - Redis is already failing; the claim is re-sendable
                    log.warning("could not release the claim of %s", request_id)
            raise
        self._call("marking the request sent", lambda: self.redis.set(key, f"{claim} sent", keepttl=True))
        log.info("submitted %s %s to %s", kind, request_id, settings.queue_name(name))
        return Handle(self, request_id, name, duplicate=not fresh)

    # -- reading ---------------------------------------------------------------------------
    def status(self, request_id: str) -> dict[str, Any]:
        """The request's latest status record; `UnknownRequestError` if it was never submitted."""
        return self.statuses([request_id])[request_id]

    def statuses(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Status records of several requests at once (one MGET)."""
        keys = [settings.status_key(r) for r in request_ids]
        values = self._call("reading statuses", lambda: self.redis.mget(keys)) if keys else []
        out: dict[str, dict[str, Any]] = {}
        for request_id, value in zip(request_ids, values):
            if value is None:
                raise UnknownRequestError(f"no request {request_id!r} was submitted to {settings.redact(self.url)}")
            out[request_id] = json.loads(value)
        return out

    def wait(self, request_ids: Sequence[str], timeout: float | None = None, poll: float = 0.2,
             on_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
        """Block until every request is terminal (applied, failed, rolled back, done).

        `on_done` is called once per request as it finishes (e.g. a progress bar). Raises
        `WaitTimeout` after `timeout` seconds, `UnknownRequestError` for an unknown id.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(request_ids))
        done: dict[str, dict[str, Any]] = {}
        delay = min(0.05, poll)
        while True:
            for request_id, record in self.statuses(pending).items():
                if is_terminal(record):
                    done[request_id] = record
                    if on_done is not None:
                        on_done(record)
            pending = [r for r in pending if r not in done]
            if not pending:
                return {r: done[r] for r in request_ids}
            if deadline is not None and time.monotonic() >= deadline:
                known = {**done, **self.statuses(pending)}
                raise WaitTimeout(f"{len(pending)} of {len(known)} requests not finished after {timeout} s", known)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(poll, delay * 2)

    def queue_length(self, name: str = DEFAULT_NAME) -> int:
        """Messages waiting on `memoir.<name>` (not counting one a worker holds)."""
        return int(self._call("reading the queue", lambda: self.redis.llen(settings.queue_name(name))))

    def worker(self, name: str = DEFAULT_NAME) -> dict[str, Any] | None:
        """The live worker of memory `name` as it announced itself, or None when none serves it."""
        value = self._call("reading workers", lambda: self.redis.get(settings.worker_key(name)))
        return json.loads(value) if value else None

    # -- dead letters (pipeline/deadletter.py) ---------------------------------------------
    def dead_letters(self, name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
        """The items the worker of memory `name` parked instead of running, oldest first: each
        {id, queue, reason, time, size, item or item_base64}."""
        check_name(name)
        return self._call("reading dead letters", lambda: deadletter.entries(self.redis, name))

    def retry_dead(self, entry_id: str, name: str = DEFAULT_NAME) -> dict[str, Any]:
        """Put a dead letter's item back on its queue; returns the entry. `UnknownDeadLetterError`
        when there is no such entry (nothing changes)."""
        check_name(name)
        return self._call("retrying a dead letter", lambda: deadletter.retry(self.redis, name, entry_id))

    def drop_dead(self, entry_id: str, name: str = DEFAULT_NAME) -> dict[str, Any]:
        """Delete a dead letter; returns the entry (`UnknownDeadLetterError` when there is none)."""
        check_name(name)
        return self._call("dropping a dead letter", lambda: deadletter.drop(self.redis, name, entry_id))


def _same_claim(existing: str, name: str, digest: str) -> bool:
    return existing.removesuffix(" sent") == f"{name} {digest}"


# -- module-level shortcuts on a default client (MEMOIR_REDIS_URL) ---------------------------
_default: Client | None = None


def default_client() -> Client:
    global _default
    if _default is None or _default.url != settings.redis_url():
        _default = Client()
    return _default


def submit(prompt: object, target: object, **kwargs: Any) -> Handle:
    return default_client().submit(prompt, target, **kwargs)


def status(request_id: str) -> dict[str, Any]:
    return default_client().status(request_id)


def rollback(edit: int | str, **kwargs: Any) -> Handle:
    return default_client().rollback(edit, **kwargs)


def replay(**kwargs: Any) -> Handle:
    return default_client().replay(**kwargs)


def wait(request_ids: Sequence[str], timeout: float | None = None) -> dict[str, dict[str, Any]]:
    return default_client().wait(request_ids, timeout=timeout)


__all__ = [
    "BrokerError", "Client", "ConflictError", "Handle", "RequestError", "UnknownDeadLetterError", "UnknownRequestError",
    "WaitTimeout", "default_client", "is_terminal", "replay", "rollback", "status", "submit", "wait",
]
