"""API keys for `memoir serve`: `--api-key KEY[:ro|:rw]` (repeatable) and `MEMOIR_API_KEYS`
(comma-separated, the same syntax; a key without a mode is read-write).

No key configured: every route is open (as before keys existed). With keys, every `/v1/...`
route needs `Authorization: Bearer KEY` (what the openai client sends): 401 without one or with
an unknown one, 403 for a read-only key on a write route (submitting and rolling back edits);
`/healthz`, `/readyz`, `/metrics` and the OpenAPI document stay open. Errors are in OpenAI's
format. A presented key is compared with every configured key in constant time (hashes of both,
`hmac.compare_digest`, no early exit), and no key ever appears in a message or a log line: a
malformed `--api-key` is named by its position, never by its text.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from serving.http import error

ENV = "MEMOIR_API_KEYS"
MODES = ("ro", "rw")
KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: what a Bearer header can carry
PROTECTED_PREFIX = "/v1/"


class KeyConfigError(ValueError):
    """A malformed key specification (the message never contains the key)."""


@dataclass(frozen=True)
class ApiKey:
    digest: bytes = field(repr=False)  # sha256 of the key: compared in constant time, never shown
    write: bool
    source: str  # "--api-key #2", "MEMOIR_API_KEYS #1": how it is named in messages


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def parse_key(spec: str, source: str) -> ApiKey:
    """`KEY`, `KEY:ro` or `KEY:rw` (a key itself has no ':', ',' or whitespace)."""
    key, sep, mode = spec.strip().rpartition(":") if ":" in spec else (spec.strip(), "", "rw")
    if sep and mode.lower() not in MODES:
        raise KeyConfigError(f"{source}: the part after the last ':' must be ro or rw")
    if not KEY_PATTERN.fullmatch(key) or ":" in key or "," in key:
        raise KeyConfigError(f"{source}: a key is 1-256 visible ASCII characters without ':' or ','")
    return ApiKey(_digest(key), mode.lower() == "rw", source)


class Keys:
    """The configured keys. `check(token)` -> the matching ApiKey or None."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)
        modes: dict[bytes, ApiKey] = {}
        for key in self.keys:
            seen = modes.setdefault(key.digest, key)
            if seen.write != key.write:
                raise KeyConfigError(f"{key.source} repeats the key of {seen.source} with another mode")

    @classmethod
    def from_options(cls, specs: Iterable[str] = (), env: str | None = None) -> "Keys":
        """Keys from `--api-key` values and the `MEMOIR_API_KEYS` value (`env`, default the
        environment's); blank entries of the variable are skipped."""
        env = os.environ.get(ENV, "") if env is None else env
        keys = [parse_key(spec, f"--api-key #{n}") for n, spec in enumerate(specs, start=1)]
        keys += [parse_key(spec, f"{ENV} #{n}") for n, spec in enumerate(env.split(","), start=1) if spec.strip()]
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"Keys({sum(k.write for k in self.keys)} read-write, {sum(not k.write for k in self.keys)} read-only)"

    def check(self, token: str | bytes) -> ApiKey | None:
        """The configured key equal to `token`, comparing with every key (constant time)."""
        digest, found = _digest(token), None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(host: str, keys: Keys) -> str | None:
    """The warning `memoir serve` prints when it binds another interface than loopback with no key."""
    if keys or is_loopback(host):
        return None
    return (f"warning: memoir serve binds {host} with no API key: anyone who can reach it can submit and roll "
            f"back edits; set --api-key KEY[:ro|:rw] or {ENV}")


def _bearer(scope: dict[str, Any]) -> bytes | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class RequireKeys:
    """ASGI middleware: with keys configured, a `/v1/...` request needs a known key, and a
    read-write one when `is_write(method, path)`. Without keys it passes everything through."""

    def __init__(self, app: Any, keys: Keys, is_write: Callable[[str, str], bool]) -> None:
        self.app, self.keys, self.is_write = app, keys, is_write

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        key = self.keys.check(token) if token is not None else None
        if key is None:
            message = ("invalid API key" if token is not None else
                       "this server needs an API key: send the header 'Authorization: Bearer <key>'")
            response = error(401, message, kind="invalid_request_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
        elif not key.write and self.is_write(scope["method"], scope["path"]):
            response = error(403, "this API key is read-only; submitting and rolling back edits needs a "
                                  "read-write key", kind="invalid_request_error", code="insufficient_permissions")
        else:
            scope.setdefault("state", {})["api_key"] = key.source  # the key's name, never the key
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


__all__ = ["ApiKey", "ENV", "KeyConfigError", "Keys", "RequireKeys", "exposure_warning", "is_loopback", "parse_key"]
