"""What one HTTP request may cost the server (`Limits`, enforced by the `Bounds` middleware), and
errors in OpenAI's format (`error`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT = 120.0


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server: its body, its time, and a place in line."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE  # requests admitted at once (tokenising, waiting or generating)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds, from the first byte to the last


class NotReady(RuntimeError):
    """The model and memory are still loading (HTTP 503)."""


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
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
            response = error(408, f"the request body did not arrive within {limits.request_timeout:g} s",
                             code="request_timeout", headers={"Connection": "close"})
        except OverflowError:
            response = error(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                             code="request_too_large", headers={"Connection": "close"})
        except ConnectionError:
            return  # the client left
        else:
            if self.admitted >= limits.max_queue:
                response = error(503, f"the server is busy ({self.admitted} requests in progress); retry later",
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
