"""Queue items and dead letters without a worker (the worker's side is tests/reliability/test_poison.py):
what the producers send is what `pipeline.envelope.check_item` accepts, and nothing else; the
client's dead-letter methods on the real Redis (this module's DB); no torch on the producer's side."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from pipeline import deadletter, settings
from pipeline.client import Client, RequestError, UnknownDeadLetterError
from pipeline.envelope import MAX_DEPTH, MAX_ITEM_BYTES, BadItem, check_item
from pipeline.schema import MAX_METADATA_DEPTH, validate_edit

REDIS = "redis://127.0.0.1:6379/9"
NAME = "dl"
QUEUE = settings.queue_name(NAME)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def sent(client: Client) -> bytes:
    """The one item the producer just put on the queue (and take it off)."""
    items = client.redis.lrange(QUEUE, 0, -1)
    assert len(items) == 1
    client.redis.delete(QUEUE)
    return items[0].encode()


def test_what_the_producers_send_is_accepted(client):
    client.submit("Who wrote Emma?", "Jane Austen", rephrases=["Emma's author?"], name=NAME,
                  metadata={"subject": "Emma", "deep": nested(MAX_METADATA_DEPTH - 1)}, replaces="same-prompt")
    assert check_item(sent(client), QUEUE)["headers"]["task"] == settings.APPLY_TASK
    client.rollback(7, reason="wrong", exact=True, name=NAME)
    assert check_item(sent(client), QUEUE)["headers"]["task"] == settings.ROLLBACK_TASK
    client.replay(from_seq=3, mode="sum", name=NAME)
    assert check_item(sent(client), QUEUE)["headers"]["task"] == settings.REPLAY_TASK
    job = "j" * 128  # a worker's next chunk: the job's id and a suffix
    client.app.send_task(settings.ROLLBACK_TASK, kwargs={"request": {"request_id": f"{job}.12", "job": job, "edit": 3,
                                                                     "name": NAME}}, task_id=f"{job}.12", queue=QUEUE)
    assert check_item(sent(client), QUEUE)["headers"]["id"] == f"{job}.12"


def test_metadata_nesting_is_bounded_before_anything_is_sent():
    validate_edit({"prompt": "q", "target": "a", "metadata": nested(MAX_METADATA_DEPTH)})
    for depth in (MAX_METADATA_DEPTH + 1, 950, 100_000):
        with pytest.raises(RequestError, match="metadata: nests deeper"):
            validate_edit({"prompt": "q", "target": "a", "metadata": nested(depth)})
    cycle: dict = {}
    cycle["self"] = cycle
    with pytest.raises(RequestError, match="metadata"):
        validate_edit({"prompt": "q", "target": "a", "metadata": cycle})


def item(client: Client, **changes) -> dict:
    client.submit("Who?", "me", name=NAME)
    envelope = json.loads(sent(client))
    for path, value in changes.items():
        where = envelope
        *parents, last = path.split("__")
        for key in parents:
            where = where[key]
        where[last] = value
    return envelope


@pytest.mark.parametrize("path, value, says", [
    ("headers__id", ["x"], "headers.id"), ("headers__task", ["memoir.apply_edit"], "headers.task"),
    ("headers__timelimit", "garbage", "headers.timelimit"), ("headers", [1], "headers is list"),
    ("headers__compression", "application/zlib", "unknown field 'compression'"),
    ("headers__eta", "2030-01-01T00:00:00", "headers.eta"), ("headers__id", "../x", "headers.id"),
    ("properties__delivery_tag", {"a": 1}, "properties.delivery_tag"),
    ("properties__priority", "high", "properties.priority"),
    ("properties__delivery_info", {"exchange": "", "routing_key": "memoir.other"}, "does not route"),
    ("content-type", "application/x-python-serialize", "the content is"),
    ("body", "not base64!", "the body is not base64"),
])
def test_an_envelope_that_is_not_exactly_a_message_is_refused(client, path, value, says):
    with pytest.raises(BadItem, match=says.replace(".", r"\.").replace("(", r"\(")):
        check_item(json.dumps(item(client, **{path: value})), QUEUE)


def test_items_that_are_not_envelopes_are_refused():
    for raw, says in ((b"\xff\xfe", "not valid UTF-8"), ("{}".encode("utf-16"), "not valid UTF-8"),
                      (b"[" * 200_000, "nests too deeply"), (json.dumps(nested(MAX_DEPTH + 1)).encode(), "deeper"),
                      (b"x" * (MAX_ITEM_BYTES + 1), "the limit is"), (b"null", "not an envelope"),
                      (b"", "not JSON")):
        with pytest.raises(BadItem, match=says):
            check_item(raw, QUEUE)


def test_dead_letters_through_the_client(client):
    first = deadletter.park(client.redis, NAME, b"\x80 not text", "first reason")
    second = deadletter.park(client.redis, NAME, '{"body": 5}', "second reason")
    found = client.dead_letters(NAME)
    assert [e["id"] for e in found] == [first, second]  # oldest first
    assert found[0]["item_base64"] and found[0]["size"] == 10 and found[1]["item"] == '{"body": 5}'
    assert found[0]["queue"] == QUEUE and found[0]["time"].endswith("+00:00")

    assert client.retry_dead(first, NAME)["reason"] == "first reason"
    with redis.Redis.from_url(REDIS) as binary:
        assert binary.lrange(QUEUE, 0, -1) == [b"\x80 not text"]  # the exact bytes, back on the queue
    assert [e["id"] for e in client.dead_letters(NAME)] == [second]

    before = client.redis.lrange(deadletter.dead_key(NAME), 0, -1)
    for bad in ("no-such-id", first, ""):
        with pytest.raises(UnknownDeadLetterError):
            client.drop_dead(bad, NAME)
    with pytest.raises(RequestError, match="name"):
        client.dead_letters("../x")
    assert client.redis.lrange(deadletter.dead_key(NAME), 0, -1) == before  # nothing changed
    client.drop_dead(second, NAME)
    assert client.dead_letters(NAME) == []


def test_the_producer_side_imports_no_torch():
    code = ("import sys, pipeline.client, pipeline.queue_commands, pipeline.deadletter, pipeline.envelope; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
