"""Poison messages against one real worker (its own redis-server, store and process): no queue
item stops it, each one either runs or is parked in `memoir.<name>.dead`, and no message field
reaches a file path.

- issue 12, defect 1: metadata nested ~950 levels deep (under 16 KB) made the worker exit 70 on
  every start;
- defect 2: malformed Celery headers (`id` a list, `task` a list, `timelimit` text, `headers` a
  list) ended the worker inside Celery;
- defect 3: a replay message's `job` became a glob (`jobs/{job}-*.safetensors`): "../checkpoints/*"
  deleted every checkpoint;
- the dead letters: `memoir queue dead|retry|drop` on what the worker parked;
- fuzzing at the envelope level (hypothesis): random headers, properties, bodies, encodings,
  nesting and sizes, pushed raw in batches; after each batch the worker is alive, every item is
  accounted for and `memoir ledger verify` passes. CI size here (MEMOIR_FUZZ_BATCHES /
  MEMOIR_FUZZ_ITEMS change it); the full size is benchmarks/fuzz_queue.py (RELIABILITY.md).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from pipeline import deadletter, settings
from pipeline.client import RequestError
from store import Store

from .harness import NAME, last_json, run_cli
from .poison import Stack, envelope, items, json_body, message, nested, nested_text, run_batch

pytestmark = pytest.mark.slow

BATCHES = int(os.environ.get("MEMOIR_FUZZ_BATCHES", "3"))
ITEMS = int(os.environ.get("MEMOIR_FUZZ_ITEMS", "15"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("poison"), checkpoint_every=2).start()
    try:
        yield stack
    finally:
        stack.close()


def parked_for(stack, raw: str | bytes) -> dict:
    raw = raw.encode() if isinstance(raw, str) else raw
    found = [e for e in stack.dead() if deadletter.raw_item(e) == raw]
    assert len(found) == 1, (raw[:200], [e["reason"] for e in stack.dead()])
    return found[0]


def assert_healthy(stack) -> None:
    assert stack.worker.alive(), stack.worker.log_text()[-3000:]
    assert stack.log_problems() == [], stack.worker.log_text()[-3000:]
    report = stack.verify()
    assert report["exit"] == 0 and report["ok"], report


# -------------------------------------------------------------------------------- defect 1


def test_deeply_nested_metadata_never_stops_the_worker(stack):
    assert len(nested_text(950)) < 16_384
    with pytest.raises(RequestError, match="metadata: nests deeper than 32"):
        stack.client.submit("Who wrote Emma?", "Jane Austen", metadata=nested(950), name=NAME)  # refused before sending
    too_deep = message(settings.APPLY_TASK, {"prompt": "Who wrote Emma?", "target": "Jane Austen", "metadata": "DEEP"})
    too_deep = json.dumps(json.loads(too_deep) | {"body": base64.b64encode(base64.b64decode(json.loads(too_deep)["body"])
                                                  .replace(b'"DEEP"', nested_text(950).encode())).decode()})
    task_id = "nested-40"  # within the envelope's bound (64 levels), beyond the metadata's (32)
    deeper_than_allowed = message(settings.APPLY_TASK, {"request_id": task_id, "prompt": "Who wrote Emma?",
                                                        "target": "Jane Austen", "metadata": nested(40)}, task_id)
    stack.push(too_deep, deeper_than_allowed)
    stack.drain()  # the edit queued behind them is applied: the worker went on
    assert "nests" in parked_for(stack, too_deep)["reason"]
    record = stack.status(task_id)
    assert record["status"] == "failed" and "metadata: nests deeper than 32" in record["reason"], record
    with Store.open(stack.store) as store:
        assert store.edit_by_request(task_id) is None  # refused before the ledger
    assert_healthy(stack)


# -------------------------------------------------------------------------------- defect 2


@pytest.mark.parametrize("header, value", [("id", ["x"]), ("task", [settings.APPLY_TASK]),
                                           ("timelimit", "garbage"), ("headers", [1]), ("compression", "zlib"),
                                           ("eta", "2999-01-01T00:00:00")])
def test_malformed_headers_are_parked_before_celery_sees_them(stack, header, value):
    item = envelope(settings.APPLY_TASK, f"headers-{header}", json_body({"prompt": "Who?", "target": "me"}))
    if header == "headers":
        item["headers"] = value
    else:
        item["headers"][header] = value
    raw = json.dumps(item)
    stack.push(raw, raw)  # twice: a second copy (as a redelivery would be) is parked too
    stack.drain()
    entries = [e for e in stack.dead() if deadletter.raw_item(e) == raw.encode()]
    assert len(entries) == 2 and all("headers" in e["reason"] for e in entries), entries
    assert stack.status(f"headers-{header}") is None  # nothing of it ran
    assert_healthy(stack)


# -------------------------------------------------------------------------------- defect 3


def checkpoint_files(stack) -> list:
    with Store.open(stack.store) as store:
        return sorted(store.path(c.file) for c in store.checkpoints(NAME))


def test_a_replay_job_never_becomes_a_path(stack):
    for n in range(4):  # checkpoints every 2 edits
        stack.drain()
    checkpoints = checkpoint_files(stack)
    assert checkpoints and all(p.is_file() for p in checkpoints)
    jobs = ("../checkpoints/*", "*", "../../../../tmp/x", "a/b", "..", ["x"])
    for n, job in enumerate(jobs):  # no edit in between: checkpoints are neither taken nor pruned meanwhile
        stack.push(message(settings.REPLAY_TASK, {"request_id": f"replay-job-{n}", "name": NAME, "mode": "sum",
                                                  "job": job}, f"replay-job-{n}"))
    for n, job in enumerate(jobs):
        key = job if job == ".." else f"replay-job-{n}"  # ".." is a valid job name (no path is made of it)
        deadline = time.monotonic() + 300
        while (stack.status(key) or {}).get("status") not in ("done", "failed"):
            assert stack.worker.alive() and time.monotonic() < deadline, stack.worker.log_text()[-3000:]
            time.sleep(0.2)
        record = stack.status(key)
        if job == "..":
            assert record["status"] == "done" and record["ok"], record
        else:
            assert record["status"] == "failed" and "job: must be" in record["reason"], (job, record)
    assert checkpoint_files(stack) == checkpoints and all(p.is_file() for p in checkpoints)
    record = stack.client.replay(name=NAME, mode="sum").wait(timeout=300)  # a real replay still works
    assert record["status"] == "done" and record["ok"] and record["live_ok"], record
    assert_healthy(stack)


def test_every_message_field_is_validated_before_use(stack):
    """Rollback and replay messages straight onto the queue: names, ids, job ids, modes and
    counts of the wrong type or shape are refused with a reason naming the field."""
    cases = {
        "rb-job": (settings.ROLLBACK_TASK, {"job": {"x": 1}, "edit": 1, "name": NAME}, "job"),
        "rb-edit-float": (settings.ROLLBACK_TASK, {"job": "rb-edit-float", "edit": 1.5, "name": NAME}, "edit"),
        "rb-edit-text": (settings.ROLLBACK_TASK, {"job": "rb-edit-text", "edit": "../1", "name": NAME}, "edit"),
        "rb-reason": (settings.ROLLBACK_TASK, {"edit": 1, "reason": "\x1b]0;x\x07", "name": NAME}, "reason"),
        "rb-exact": (settings.ROLLBACK_TASK, {"edit": 1, "exact": "yes", "name": NAME}, "exact"),
        "rb-name": (settings.ROLLBACK_TASK, {"edit": 1, "name": "../x"}, "name"),
        "rp-mode": (settings.REPLAY_TASK, {"mode": "../x", "name": NAME}, "mode"),
        "rp-from": (settings.REPLAY_TASK, {"from_seq": 10**30, "name": NAME, "mode": "sum"}, ""),
        "rp-name": (settings.REPLAY_TASK, {"name": ["x"], "mode": "sum"}, "memory"),
    }
    for task_id, (task, request, _) in cases.items():
        stack.push(message(task, {"request_id": task_id, **request}, task_id))
    stack.drain()
    for task_id, (_, _, field) in cases.items():
        record = stack.status(task_id)
        assert record is not None and record["status"] in ("failed", "done"), (task_id, record)
        if record["status"] == "failed":
            assert field in record["reason"], (task_id, record)
    assert_healthy(stack)


# ---------------------------------------------------------------------------- dead letters


def cli(stack, *args: str):
    return run_cli("queue", *args, env=stack.server.env)


def test_dead_letters_are_listed_retried_and_dropped_from_the_cli(stack):
    junk = b"\xff\xfe not UTF-8 \x80"
    stack.push(junk)
    stack.drain()
    listed = cli(stack, "dead", "--name", NAME, "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(e for e in last_json(listed.stdout) if deadletter.raw_item(e) == junk)
    assert entry["reason"] and entry["time"] and entry["size"] == len(junk) and "item_base64" in entry
    assert entry["id"] in cli(stack, "dead", "--name", NAME).stdout

    # retry: the exact bytes go back on the queue; not a message, so parked again under a new id
    done = cli(stack, "retry", entry["id"], "--name", NAME)
    assert done.returncode == 0, done.stderr
    stack.drain()
    again = [e for e in stack.dead() if deadletter.raw_item(e) == junk]
    assert [e["id"] != entry["id"] for e in again] == [True]

    # a good message parked by hand (the same code the worker parks with) runs once retried
    good_id = f"retried-{os.getpid()}"
    good = message(settings.APPLY_TASK, {"request_id": good_id, "prompt": "Who painted the Night Watch?",
                                         "target": "Rembrandt"}, good_id)
    parked = deadletter.park(stack.redis, NAME, good, "parked by the test")
    assert cli(stack, "retry", parked, "--name", NAME, "--json").returncode == 0
    assert stack.client.wait([good_id], timeout=300)[good_id]["status"] == "applied"
    assert parked not in {e["id"] for e in stack.dead()}

    # drop, and what an unknown id or a bad name does: a clear error, nothing changes
    before = stack.dead()
    for args, error in ((("drop", "0123456789abcdef", "--name", NAME), "no dead letter '0123456789abcdef'"),
                        (("retry", "nope", "--name", NAME), "no dead letter 'nope'"),
                        (("dead", "--name", "../x"), "name: must be"),
                        (("drop", again[0]["id"], "--name", "other"), "no dead letter")):
        failed = cli(stack, *args)
        assert failed.returncode != 0 and error in failed.stderr, (args, failed.stderr)
    assert stack.dead() == before
    dropped = cli(stack, "drop", again[0]["id"], "--name", NAME, "--json")
    assert dropped.returncode == 0 and last_json(dropped.stdout)["action"] == "drop"
    assert again[0]["id"] not in {e["id"] for e in stack.dead()}
    assert_healthy(stack)


# -------------------------------------------------------------------------------- fuzzing


@hsettings(max_examples=BATCHES, deadline=None, database=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=st.lists(items(), min_size=ITEMS, max_size=ITEMS))
def test_fuzzed_queue_items_never_stop_the_worker(stack, batch):
    result = run_batch(stack, batch)
    print(result.to_dict(), file=sys.stderr)
    assert result.ok(), result.to_dict()
