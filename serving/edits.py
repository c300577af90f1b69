"""The HTTP edit API of `memoir serve`, beside the OpenAI routes: what `memoir submit`, `memoir
status`, `memoir rollback` and `memoir ledger list` do, for services that are not written in Python.

- `POST /v1/edits`: one edit request, the JSON of `memoir submit` (`pipeline.schema.EditRequest`;
  `GET /v1/schemas/edit-request` is its JSON Schema). The `Idempotency-Key` header is the request
  id. 202 with the request's status record; the same key with the same payload again: 200 and
  the same edit (nothing is queued twice); with another payload: 409.
- `GET /v1/edits/{id}`: the status record of request `id` (`submitted`, `queued`, `applying`,
  `applied`, `failed`, `rolled_back`; a rollback's: `done` or `failed`) with its `edit_id`,
  `seq` and `scores`, and its ledger row (`ledger`, as `memoir ledger list --json` prints it).
- `POST /v1/edits/{id}/rollback` (optional body `{"reason": ..., "exact": false}`;
  `Idempotency-Key` = the rollback's request id): queue the rollback of edit `id` behind the
  memory's edits. 202 with the rollback's status record; poll `GET /v1/edits/{rollback id}`.
- `GET /v1/ledger?limit=&after_seq=&status=`: the served memory's ledger in sequence order, one
  page at a time (`next_after_seq` is the next page's `after_seq` while `has_more`).

Every write goes through `pipeline.client.Client`, onto the memory's queue, like the CLI's: the
worker applies edits and rollbacks in queue order and each request id at most once. Bad input
(400), an unknown id (404), a conflicting key (409) queue nothing. Redis that does not answer
within the API's timeout is a 503, never a hang; so is an unreadable ledger. Errors are in
OpenAI's format (`serving.http.error`). Blocking calls run on worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Header, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from peewee import DatabaseError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.concurrency import run_in_threadpool

from pipeline.client import BrokerError, Client, ConflictError, UnknownRequestError
from pipeline.schema import EditRequest, RequestError, check_request_id, edit_request_json_schema, validate_edit
from serving.http import NotReady, error
from store import Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds Redis (or the ledger) may take to answer one API call
DEFAULT_PAGE = 50
MAX_PAGE = 500
WRITE_ROUTES = (("POST", re.compile(r"/v1/edits/?")), ("POST", re.compile(r"/v1/edits/[^/]+/rollback/?")))
ENDED = ("failed", "rolled_back")  # an edit in one of these has nothing left to roll back

T = TypeVar("T")


def is_write(method: str, path: str) -> bool:
    """Whether a request changes a memory (it needs a read-write key): submitting, rolling back."""
    return any(method == m and pattern.fullmatch(path) for m, pattern in WRITE_ROUTES)


class Problem(Exception):
    """An answer in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = (
            status, message, param, kind, code, headers)

    def response(self) -> JSONResponse:
        return error(self.status, self.message, self.param, self.kind, self.code, self.headers)


class EditAPI:
    """What the routes need: the memory served (`name`), a client on Redis (`redis_url`, default
    `MEMOIR_REDIS_URL`) and the seconds one call may wait for Redis or the ledger."""

    def __init__(self, name: str, redis_url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self.client = Client(redis_url, socket_timeout=timeout)
        self.sending = threading.Lock()  # one submit or rollback at a time through the Celery producer

    def close(self) -> None:
        self.client.close()


# -- published schemas (OpenAPI) -----------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error format."""

    error: ErrorDetail


class RequestStatus(BaseModel):
    """A request's status record (the worker's mirror in Redis), and its ledger row."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="The request id (the Idempotency-Key).")
    object: Literal["edit", "rollback", "replay"] = Field(description="What the request does.")
    request_id: str
    name: str = Field(description="The memory.")
    kind: str
    status: str = Field(description="submitted, queued, applying, applied, failed or rolled_back (an edit); "
                                    "submitted, done or failed (a rollback).")
    edit_id: int | None = Field(None, description="The edit's ledger id, once recorded.")
    seq: int | None = Field(None, description="The edit's ledger sequence number, once recorded.")
    scores: dict[str, Any] | None = Field(None, description="Scores measured when the edit was applied.")
    reason: str | None = None
    updated_at: str | None = None
    duplicate: bool | None = Field(None, description="On submit: the key was submitted before with this payload.")
    ledger: dict[str, Any] | None = Field(None, description="The ledger row, as `memoir ledger list --json` "
                                                            "prints it (null before the worker records it).")


class LedgerPage(BaseModel):
    object: Literal["list"] = "list"
    name: str
    data: list[dict[str, Any]] = Field(description="Edits in sequence order, as `memoir ledger list --json` "
                                                   "prints them.")
    has_more: bool
    next_after_seq: int | None = Field(None, description="Pass as after_seq for the next page (null at the end).")


class RollbackBody(BaseModel):
    """The optional body of a rollback."""

    model_config = ConfigDict(extra="forbid", title="memoir rollback request")

    reason: str | None = Field(None, description="Kept in the ledger's event log.")
    exact: StrictBool = Field(False, description="Re-train every later edit (slow, exact) instead of replaying "
                                                 "only the overlapping ones that got worse.")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# -- helpers -------------------------------------------------------------------------------------
def parse_json(raw: bytes, *, optional: bool = False) -> Any:
    """A request body as JSON: RequestError("body", ...) for an empty one, invalid UTF-8 or not JSON."""
    if not raw.strip():
        if optional:
            return {}
        raise RequestError("body", "is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("body", f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RequestError("body", "is not JSON (nested too deeply)") from None


def _ledger_status(row: dict[str, Any]) -> dict[str, Any]:
    """The status record of an edit known only to the ledger (its Redis key expired)."""
    return {"request_id": row["request_id"], "name": row["memory"], "kind": "edit", "status": row["status"],
            "edit_id": row["id"], "seq": row["seq"], "scores": row["scores"], "reason": row["reason"],
            "updated_at": row["updated_at"]}


def _view(record: dict[str, Any], ledger: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    kind = record.get("kind", "edit")
    return {"id": record["request_id"], "object": kind if kind in ("edit", "rollback", "replay") else "edit",
            **record, **extra, "ledger": ledger}


def edit_routes(api: EditAPI, store_: Callable[[], Store]) -> APIRouter:
    """The routes. `store_()` is the served memory's store (NotReady while it loads)."""
    router = APIRouter(tags=["edits"], dependencies=[Security(HTTPBearer(
        auto_error=False, description="An API key, when the server has any (read-write for edits and rollbacks)."))])

    async def blocking(request: Request, fn: Callable[[], T]) -> T:
        """`fn()` on a worker thread within the API's timeout (and the request's deadline)."""
        budget = api.timeout
        deadline = getattr(request.state, "deadline", None)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.monotonic()))
        try:
            return await asyncio.wait_for(run_in_threadpool(fn), budget)
        except asyncio.TimeoutError:
            raise Problem(503, f"Redis or the ledger did not answer within {budget:g} s; retry later",
                          kind="server_error", code="unavailable", headers={"Retry-After": "1"}) from None

    async def answer(request: Request, handler: Callable[[], Any]) -> JSONResponse:
        try:
            return await handler()
        except Problem as exc:
            return exc.response()
        except ConflictError as exc:
            return error(409, str(exc), exc.field, code="idempotency_conflict")
        except RequestError as exc:
            return error(400, str(exc), exc.field)
        except BrokerError as exc:
            log.warning("edit API: %s", exc)
            return error(503, f"the queue is unavailable: {exc}", kind="server_error", code="broker_unavailable",
                         headers={"Retry-After": "1"})
        except NotReady:
            raise
        except (StoreError, DatabaseError, OSError) as exc:
            log.warning("edit API: the ledger: %s", exc)
            return error(503, f"the ledger is unavailable: {str(exc).strip()}", kind="server_error",
                         code="ledger_unavailable", headers={"Retry-After": "1"})

    def ledger_row(request_id: str) -> dict[str, Any] | None:
        """The request's ledger row, or None (not recorded yet, or the store still loading)."""
        try:
            store = store_()
        except NotReady:
            return None
        edit = store.edit_by_request(request_id)
        return edit.to_dict(with_mask=False) if edit is not None else None

    def lookup(request_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(status record, ledger row) of a request; 404 when neither Redis nor the ledger knows it."""
        try:
            record: dict[str, Any] | None = api.client.status(request_id)
        except UnknownRequestError:
            record = None
        row = ledger_row(request_id)
        if record is None:
            if row is None:
                raise Problem(404, f"no request {request_id!r} was submitted", "id", code="not_found")
            record = _ledger_status(row)
        return record, row

    def rollback_body(raw: bytes) -> RollbackBody:
        try:
            return RollbackBody.model_validate(parse_json(raw, optional=True))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise Problem(400, f"{where}: {first['msg']}", where) from None

    def checked_id(value: str, param: str = "id") -> str:
        try:
            return check_request_id(value, param)
        except RequestError as exc:
            raise Problem(400, str(exc), param) from None

    def key_of(idempotency_key: str | None) -> str | None:
        return None if idempotency_key is None else checked_id(idempotency_key, "Idempotency-Key")

    @router.post("/v1/edits", status_code=202, response_model=None,
                 summary="Submit an edit (the JSON of memoir submit)",
                 responses={202: {"model": RequestStatus, "description": "Queued."},
                            200: {"model": RequestStatus, "description": "This Idempotency-Key was submitted before "
                                                                         "with this payload: the same edit."},
                            **_errors(400, 401, 403, 409, 503)},
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": edit_request_json_schema()}}}})
    async def submit(request: Request, idempotency_key: str | None = Header(
            None, alias="Idempotency-Key", description="The request id: a repeat with the same payload is the "
                                                        "same edit; with another payload, 409.")) -> JSONResponse:
        def checked(raw: bytes, key: str | None) -> EditRequest:
            data = parse_json(raw)
            if isinstance(data, dict):
                given = data.get("request_id")
                if key is not None:
                    if given is not None and given != key:
                        raise Problem(400, "request_id: differs from the Idempotency-Key header; send one of them",
                                      "request_id")
                    data = {**data, "request_id": key}
                if data.get("name") is None:
                    data = {**data, "name": api.name}
            edit = validate_edit(data)
            if edit.name != api.name:
                raise Problem(400, f"name: this server edits memory {api.name!r}, not {edit.name!r}", "name")
            return edit

        async def handle() -> JSONResponse:
            key = key_of(idempotency_key)
            edit = await run_in_threadpool(checked, await request.body(), key)  # parsing: off the event loop

            def send() -> tuple[bool, dict[str, Any]]:
                with api.sending:
                    handle = api.client.submit_request(edit)
                return handle.duplicate, api.client.status(edit.request_id)

            duplicate, record = await blocking(request, send)
            log.info("edit API: %s edit %s", "repeated" if duplicate else "submitted", edit.request_id)
            return JSONResponse(_view(record, None, duplicate=duplicate), status_code=200 if duplicate else 202,
                                headers={"Location": f"/v1/edits/{edit.request_id}"})

        return await answer(request, handle)

    @router.get("/v1/edits/{id}", response_model=None, summary="A request's status, scores and ledger row",
                responses={200: {"model": RequestStatus}, **_errors(400, 401, 404, 503)})
    async def status(request: Request, id: str) -> JSONResponse:  # noqa: A002 - the route's name for it
        async def handle() -> JSONResponse:
            request_id = checked_id(id)
            record, row = await blocking(request, lambda: lookup(request_id))
            return JSONResponse(_view(record, row))

        return await answer(request, handle)

    @router.post("/v1/edits/{id}/rollback", status_code=202, response_model=None,
                 summary="Roll an edit back (queued behind the memory's edits)",
                 responses={202: {"model": RequestStatus, "description": "Queued: poll GET /v1/edits/{rollback id}."},
                            200: {"model": RequestStatus, "description": "This Idempotency-Key was submitted before "
                                                                         "with this payload: the same rollback."},
                            **_errors(400, 401, 403, 404, 409, 503)},
                 openapi_extra={"requestBody": {"required": False, "content": {
                     "application/json": {"schema": RollbackBody.model_json_schema()}}}})
    async def rollback(request: Request, id: str, idempotency_key: str | None = Header(  # noqa: A002
            None, alias="Idempotency-Key", description="The rollback's request id.")) -> JSONResponse:
        async def handle() -> JSONResponse:
            request_id = checked_id(id)
            key = key_of(idempotency_key)
            body = await run_in_threadpool(rollback_body, await request.body())

            def send() -> tuple[bool, dict[str, Any]]:
                client = api.client
                repeat = False
                if key is not None:
                    try:
                        repeat = client.status(key) is not None
                    except UnknownRequestError:
                        pass
                if not repeat:  # a first rollback: the edit must exist here and still be live or pending
                    record, _ = lookup(request_id)
                    if record.get("kind", "edit") != "edit":
                        raise Problem(400, f"request {request_id!r} is a {record.get('kind')}, not an edit", "id")
                    if record.get("name") != api.name:
                        raise Problem(409, f"edit {request_id!r} belongs to memory {record.get('name')!r}; this "
                                           f"server edits {api.name!r}", "id", code="other_memory")
                    if record.get("status") in ENDED:
                        raise Problem(409, f"edit {request_id!r} is {record['status']}: there is nothing to roll "
                                           f"back", "id", code="not_live")
                with api.sending:
                    handle = client.rollback(request_id, reason=body.reason, exact=body.exact, name=api.name,
                                             request_id=key)
                return handle.duplicate, client.status(handle.request_id)

            duplicate, record = await blocking(request, send)
            log.info("edit API: %s rollback %s of %s", "repeated" if duplicate else "submitted",
                     record["request_id"], request_id)
            return JSONResponse(_view(record, None, duplicate=duplicate, edit=request_id),
                                status_code=200 if duplicate else 202,
                                headers={"Location": f"/v1/edits/{record['request_id']}"})

        return await answer(request, handle)

    @router.get("/v1/ledger", response_model=None, summary="The memory's ledger, one page at a time",
                responses={200: {"model": LedgerPage}, **_errors(400, 401, 503)})
    async def ledger(request: Request,
                     limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="Edits per page."),
                     after_seq: int = Query(0, ge=0, description="Only edits with a greater sequence number."),
                     status: str | None = Query(None, description="Only edits in this status (queued, applying, "
                                                                  "applied, failed, rolled_back).")) -> JSONResponse:
        async def handle() -> JSONResponse:
            def read() -> list[dict[str, Any]]:
                try:
                    edits = store_().edits_after(api.name, after_seq, limit + 1, status)
                except StoreError as exc:
                    if "unknown status" in str(exc):
                        raise Problem(400, f"status: {exc}", "status") from None
                    raise
                return [e.to_dict(with_mask=False) for e in edits]

            rows = await blocking(request, read)
            more = len(rows) > limit
            rows = rows[:limit]
            page = LedgerPage(name=api.name, data=rows, has_more=more,
                              next_after_seq=rows[-1]["seq"] if more else None)
            return JSONResponse(page.model_dump())

        return await answer(request, handle)

    @router.get("/v1/schemas/edit-request", summary="The JSON Schema of POST /v1/edits' body")
    async def schema() -> dict[str, Any]:
        """JSON Schema (draft 2020-12) of an edit request, with this server's limits and memory."""
        out = edit_request_json_schema()
        out["properties"]["name"]["default"] = api.name
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **out}

    return router


__all__ = ["EditAPI", "edit_routes", "is_write", "parse_json"]
