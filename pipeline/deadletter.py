"""Dead letters: queue items a worker did not run, parked in the Redis list `memoir.<name>.dead`.

A worker parks an item of its queue that is not a message it runs (pipeline/envelope.py) or
whose task failed because of what the message holds, and goes on with the next one. Each entry
is one JSON object: `id` (16 hex digits, fixed when parked: what `retry` and `drop` take),
`queue`, `reason`, `time` (UTC, ISO 8601), `size` (bytes) and the raw item, as `item` when it
is UTF-8 text, else as `item_base64`. `retry` puts the raw item back at the end of the queue,
`drop` deletes the entry; both in one Redis transaction, so an entry is never both in the queue
and in the list, nor lost between them. No torch, no Celery.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline.settings import queue_name

if TYPE_CHECKING:
    import redis

MAX_REASON_CHARS = 2000


class UnknownDeadLetterError(LookupError):
    """No dead letter with this id in the memory's list."""


def dead_key(name: str) -> str:
    """The dead-letter list of memory `name`: `memoir.<name>.dead` (no queue can have this name)."""
    return f"{queue_name(name)}.dead"


def park(client: "redis.Redis", name: str, item: bytes | str, reason: str) -> str:
    """Append `item` (as taken from the queue) with the reason to the memory's dead letters;
    returns the entry's id."""
    raw = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
    entry: dict[str, Any] = {"id": uuid.uuid4().hex[:16], "queue": queue_name(name), "reason": reason[:MAX_REASON_CHARS],
                             "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "size": len(raw)}
    try:
        entry["item"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["item_base64"] = base64.b64encode(raw).decode("ascii")
    client.rpush(dead_key(name), json.dumps(entry))  # ASCII JSON: readable whatever the item's bytes
    return entry["id"]


def _entry(text: bytes | str) -> dict[str, Any]:
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):  # written by someone else than `park`: shown as is, never acted on by id
        entry = None
    return entry if isinstance(entry, dict) else {"id": None, "reason": "not a dead-letter entry", "item": str(text)}


def entries(client: "redis.Redis", name: str) -> list[dict[str, Any]]:
    """The memory's dead letters, oldest first."""
    return [_entry(text) for text in client.lrange(dead_key(name), 0, -1)]


def raw_item(entry: dict[str, Any]) -> bytes:
    """The item as it was taken from the queue."""
    if "item_base64" in entry:
        return base64.b64decode(entry["item_base64"])
    return str(entry.get("item", "")).encode("utf-8", "surrogatepass")


def _take(client: "redis.Redis", name: str, entry_id: str, requeue: bool) -> dict[str, Any]:
    """Remove entry `entry_id` (and with `requeue`, push its item back onto the queue) atomically."""
    key, found = dead_key(name), {}

    def move(pipe: Any) -> None:
        found.clear()
        for text in pipe.lrange(key, 0, -1):
            entry = _entry(text)
            if entry.get("id") == entry_id:
                found.update(entry)
                pipe.multi()
                pipe.lrem(key, 1, text)
                if requeue:
                    pipe.lpush(queue_name(name), raw_item(entry))  # kombu BRPOPs: the end of the line
                return
        raise UnknownDeadLetterError(f"no dead letter {entry_id!r} in {key}")

    client.transaction(move, key)
    return found


def retry(client: "redis.Redis", name: str, entry_id: str) -> dict[str, Any]:
    """Put a dead letter's item back on its queue (it runs, or is parked again with a new id)."""
    return _take(client, name, entry_id, requeue=True)


def drop(client: "redis.Redis", name: str, entry_id: str) -> dict[str, Any]:
    """Delete a dead letter for good."""
    return _take(client, name, entry_id, requeue=False)


__all__ = ["UnknownDeadLetterError", "dead_key", "drop", "entries", "park", "raw_item", "retry"]
