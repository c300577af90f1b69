"""What a worker accepts from its queue, checked before Celery (or kombu) sees an item.

An item of `memoir.<name>` is a message only when it is exactly what this project's producers
send (Celery task protocol 2 in kombu's Redis envelope, JSON throughout): at most
MAX_ITEM_BYTES, UTF-8 JSON no deeper than MAX_DEPTH, only the known keys with the known types,
one of the memoir tasks, an id and delivery tag of the safe characters, no ETA, expiry, time
limit, compression or callbacks, routed to the queue it was taken from, and a body of
`[[], {"request": ...}, {callbacks/errbacks/chain/chord: null}]`. Anything else would reach code
that is not written for hostile input (kombu decodes, Celery schedules, links and calls), so
`check_item` names what is wrong and the worker parks the item (pipeline/deadletter.py).

No torch, no Celery here: producers and the CLI import it too.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from pipeline.schema import json_depth
from pipeline.settings import APPLY_TASK, REPLAY_TASK, ROLLBACK_TASK

MAX_ITEM_BYTES = 1 << 20  # a valid edit is under 400 KB as a queue item (texts, rephrases, metadata)
MAX_DEPTH = 64  # nesting of the item's JSON and of its body's; metadata has its own, smaller bound
TASKS = (APPLY_TASK, ROLLBACK_TASK, REPLAY_TASK)
TASK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")  # request ids (128) and the workers' chunk ids (+ a suffix)
CONTENT = ("application/json", "utf-8")
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
TOP_KEYS = frozenset({"body", "content-encoding", "content-type", "headers", "properties", "redelivered"})


class BadItem(ValueError):
    """A queue item that is not a message this worker runs; the text says why."""


def _optional_id(value: Any) -> bool:
    return value is None or (isinstance(value, str) and bool(TASK_ID.fullmatch(value)))


def _text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _count(value: Any, top: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top)


# header -> test of its value (kombu adds `redelivered` when it restores an unacknowledged message)
HEADERS = {
    "lang": lambda v: v in (None, "py"),
    "task": lambda v: v in TASKS,
    "id": lambda v: isinstance(v, str) and bool(TASK_ID.fullmatch(v)),
    "root_id": _optional_id, "parent_id": _optional_id,
    "shadow": lambda v: v is None, "eta": lambda v: v is None, "expires": lambda v: v is None,
    "group": lambda v: v is None, "group_index": lambda v: v is None,
    "retries": lambda v: _count(v, 1000), "replaced_task_nesting": lambda v: _count(v, 0),
    "timelimit": lambda v: v is None or v == [None, None],
    "argsrepr": _text, "kwargsrepr": _text, "origin": _text,
    "ignore_result": lambda v: v is None or isinstance(v, bool),
    "stamped_headers": lambda v: v in (None, []), "stamps": lambda v: v in (None, {}),
    "redelivered": lambda v: isinstance(v, bool),
}
PROPERTIES = {
    "correlation_id": _optional_id, "reply_to": _text,
    "delivery_mode": lambda v: v in (None, 1, 2) and not isinstance(v, bool),
    "priority": lambda v: _count(v, 255),
    "body_encoding": lambda v: v == "base64",
    "delivery_tag": lambda v: isinstance(v, str) and bool(TASK_ID.fullmatch(v)),
    "delivery_info": lambda v: isinstance(v, dict),
}
REQUIRED_HEADERS = ("task", "id")
REQUIRED_PROPERTIES = ("body_encoding", "delivery_tag", "delivery_info")


def loads(text: str | bytes, what: str) -> Any:
    """JSON no deeper than MAX_DEPTH; BadItem otherwise (decoding errors, too deep, bad UTF-8)."""
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:
        raise BadItem(f"{what} nests too deeply") from None
    except UnicodeDecodeError as exc:
        raise BadItem(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise BadItem(f"{what} is not JSON ({exc})") from None
    if json_depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise BadItem(f"{what} nests deeper than {MAX_DEPTH} levels")
    return value


def _check_fields(section: str, fields: Any, tests: dict, required: tuple[str, ...]) -> None:
    if not isinstance(fields, dict):
        raise BadItem(f"{section} is {type(fields).__name__}, not an object")
    for key in required:
        if key not in fields:
            raise BadItem(f"{section}.{key} is missing")
    for key, value in fields.items():
        test = tests.get(key)
        if test is None:
            raise BadItem(f"{section} has an unknown field {key[:64]!r}")
        if not test(value):
            raise BadItem(f"{section}.{key} is not valid: {json.dumps(value)[:120]}")


def check_item(raw: bytes | str, queue: str) -> dict[str, Any]:
    """The envelope of queue item `raw` taken from `queue`, when it is a message the worker
    runs; BadItem (saying why) otherwise. Never raises anything else."""
    try:
        size = len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
        if size > MAX_ITEM_BYTES:
            raise BadItem(f"the item is {size} bytes; the limit is {MAX_ITEM_BYTES}")
        envelope = loads(raw, "the item")
        _check_envelope(envelope, queue)
        return envelope
    except BadItem:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the item, the answer is "not a message"
        raise BadItem(f"the item could not be checked ({type(exc).__name__}: {exc})") from None


def _check_envelope(envelope: Any, queue: str) -> None:
    if not isinstance(envelope, dict):
        raise BadItem(f"the item is a JSON {type(envelope).__name__}, not an envelope object")
    unknown = sorted(set(envelope) - TOP_KEYS)
    if unknown:
        raise BadItem(f"the envelope has an unknown field {unknown[0][:64]!r}")
    if "redelivered" in envelope and not isinstance(envelope["redelivered"], bool):
        raise BadItem("the envelope's redelivered is not true or false")
    if (envelope.get("content-type"), envelope.get("content-encoding")) != CONTENT:
        raise BadItem(f"the content is {envelope.get('content-type')!r} in {envelope.get('content-encoding')!r}, "
                      f"not {CONTENT[0]} in {CONTENT[1]}")
    _check_fields("headers", envelope.get("headers"), HEADERS, REQUIRED_HEADERS)
    properties = envelope.get("properties")
    _check_fields("properties", properties, PROPERTIES, REQUIRED_PROPERTIES)
    info = properties["delivery_info"]
    if info.get("exchange", "") != "" or info.get("routing_key") != queue or \
            not all(isinstance(v, (str, bool, int, type(None))) for v in info.values()):
        raise BadItem(f"properties.delivery_info does not route to {queue}: {json.dumps(info)[:120]}")
    body = envelope.get("body")
    if not isinstance(body, str):
        raise BadItem(f"the body is {type(body).__name__}, not base64 text")
    try:
        decoded = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadItem("the body is not base64") from None
    _check_body(loads(decoded, "the body"))


def _check_body(body: Any) -> None:
    """Celery's protocol 2 body for these tasks: no positional arguments, `request` only, no links."""
    if not (isinstance(body, list) and len(body) == 3):
        raise BadItem("the body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if args != []:
        raise BadItem("the task takes no positional arguments")
    if not isinstance(kwargs, dict) or set(kwargs) != {"request"}:
        raise BadItem("the task's keyword arguments are not exactly {request}")
    if not isinstance(embed, dict) or not set(embed) <= EMBED_KEYS or any(v is not None for v in embed.values()):
        raise BadItem("the body carries callbacks, a chain or a chord (only null is accepted)")


__all__ = ["BadItem", "MAX_DEPTH", "MAX_ITEM_BYTES", "TASKS", "check_item", "loads"]
