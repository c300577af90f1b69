"""Hostile queue items against a real worker: hand-made envelopes, the hypothesis strategies that
generate them at random (headers, properties, bodies, encodings, nesting, sizes), and one batch
of the fuzzing that both tests/reliability/test_poison.py (CI size) and
benchmarks/fuzz_queue.py (full size) run.

A batch is pushed raw onto `memoir.<name>` (around the client and Celery's producer), then a
marker edit is submitted and waited for: once it is applied, every item before it was handled.
Then each item must have either run (it is a message the worker accepts, and its request has a
status record) or been parked in `memoir.<name>.dead` with a reason; the worker must be alive,
its log free of Celery's "Unrecoverable error", and `memoir ledger verify` must pass.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from pipeline import deadletter, settings
from pipeline.envelope import BadItem, check_item

from .harness import NAME, RedisServer, WorkerProcess, last_json, make_memory, run_cli

TASKS = (settings.APPLY_TASK, settings.ROLLBACK_TASK, settings.REPLAY_TASK)


# ------------------------------------------------------------------------------ hand-made items


def envelope(task: str, task_id: Any, body: bytes, content_type: str = "application/json",
             encoding: str = "utf-8", queue: str | None = None) -> dict[str, Any]:
    """A message as kombu's Redis transport keeps it in the queue's list (protocol 2), as a dict."""
    return {
        "body": base64.b64encode(body).decode(), "content-encoding": encoding, "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
                    "retries": 0, "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue or settings.queue_name(NAME)},
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }


def json_body(request: object) -> bytes:
    """A task body (args, kwargs, embed) carrying `request`."""
    return json.dumps([[], {"request": request}, {"callbacks": None, "errbacks": None, "chain": None,
                                                  "chord": None}]).encode()


def message(task: str, request: object, task_id: str | None = None) -> str:
    """A whole queue item: the task `task` with `request`, as the worker's own producers would send it."""
    task_id = task_id or f"hand-{uuid.uuid4().hex[:12]}"
    return json.dumps(envelope(task, task_id, json_body(request)))


def nested(depth: int, leaf: Any = "x") -> Any:
    """{"a": {"a": ... leaf}} `depth` objects deep (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_text(depth: int) -> str:
    """`nested(depth)` as JSON text, written without a JSON encoder (which would recurse)."""
    return '{"a": ' * depth + '"x"' + "}" * depth


# ------------------------------------------------------------------------------------ the stack


class Stack:
    """A private redis-server, a memory on the built-in tiny model and a `memoir worker` on it."""

    def __init__(self, root: Path, checkpoint_every: int = 1000) -> None:
        from pipeline.client import Client

        self.root = root
        self.server = RedisServer(root / "redis").start()
        self.store = root / "store"
        make_memory(self.store, n_iter=3, checkpoint_every=checkpoint_every)
        self.worker = WorkerProcess(self.store, self.server.env, root / "worker.log")
        self.client = Client(self.server.url)
        self.markers = 0

    def start(self) -> "Stack":
        self.worker.ready()
        return self

    def close(self) -> None:
        self.worker.stop()
        self.client.close()
        self.server.kill()

    @property
    def redis(self) -> Any:
        return self.client.redis

    def push(self, *items: bytes | str) -> None:
        """Items straight onto the memory's queue, as anyone who can write to Redis could."""
        for item in items:
            self.redis.lpush(settings.queue_name(NAME), item)

    def drain(self, timeout: float = 300) -> dict[str, Any]:
        """A marker edit through the queue: once it is applied, everything queued before was handled."""
        from pipeline.client import WaitTimeout

        self.markers += 1
        handle = self.client.submit(f"What is marker number {self.markers} of this run?", f"marker {self.markers}",
                                    name=NAME)
        deadline = time.monotonic() + timeout
        while True:
            assert self.worker.alive(), f"the worker died:\n{self.worker.log_text()[-3000:]}"
            try:
                record = handle.wait(timeout=1)
                break
            except WaitTimeout:
                assert time.monotonic() < deadline, f"the marker was not applied:\n{self.worker.log_text()[-3000:]}"
        assert record["status"] == "applied", (record, self.worker.log_text()[-3000:])
        return record

    def dead(self) -> list[dict[str, Any]]:
        return deadletter.entries(self.redis, NAME)

    def status(self, request_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(settings.status_key(request_id))
        return json.loads(raw) if raw else None

    def verify(self) -> dict[str, Any]:
        done = run_cli("ledger", "verify", "--store", str(self.store), "--json")
        report = last_json(done.stdout)
        report["exit"] = done.returncode
        return report

    def log_problems(self) -> list[str]:
        text = self.worker.log_text()
        return [p for p in ("Unrecoverable error", "stopping the worker") if p in text]


# ---------------------------------------------------------------------------------- strategies

_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
         | st.text(max_size=12))
json_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
ids = st.one_of(st.uuids().map(str), st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True), json_values)
requests = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=40), "target": st.text(max_size=20)},
                          optional={"rephrases": st.lists(st.text(max_size=20), max_size=3) | json_values,
                                    "metadata": json_values | st.integers(1, 80).map(nested),
                                    "replaces": json_values | st.integers(-2, 5) | st.just("same-prompt"),
                                    "name": st.sampled_from([NAME, "other", ""]) | json_values,
                                    "request_id": ids}),
    st.fixed_dictionaries({}, optional={"edit": json_values | st.integers(-2, 10), "reason": json_values,
                                        "exact": json_values, "job": ids, "name": st.just(NAME) | json_values,
                                        "from_seq": json_values | st.integers(-2, 10),
                                        "mode": st.sampled_from(["sum", "retrain", "../x"]) | json_values}),
    json_values,
)
HEADER_KEYS = ("lang", "task", "id", "root_id", "parent_id", "shadow", "eta", "expires", "group", "group_index",
               "retries", "timelimit", "argsrepr", "kwargsrepr", "origin", "ignore_result", "stamps",
               "compression", "redelivered", "x-unknown")
PROPERTY_KEYS = ("correlation_id", "reply_to", "delivery_mode", "priority", "delivery_info", "body_encoding",
                 "delivery_tag")


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A task body: usually well formed around a random request, sometimes anything at all."""
    kind = draw(st.sampled_from(["request", "request", "request", "shape", "json", "bytes", "deep"]))
    if kind == "request":
        return json_body(draw(requests))
    if kind == "shape":
        return json.dumps([draw(json_values), draw(json_values), draw(json_values)]).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode(draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])), "replace")
    if kind == "deep":
        request = '{"prompt": "q?", "target": "a", "metadata": %s}' % nested_text(draw(st.integers(20, 3000)))
        return json_body("REQUEST").replace(b'"REQUEST"', request.encode())
    return draw(st.binary(max_size=64))


@st.composite
def items(draw: st.DrawFn) -> bytes:
    """One queue item: a mutated envelope most of the time, else raw bytes, text or JSON."""
    kind = draw(st.sampled_from(["envelope"] * 6 + ["bytes", "text", "json", "deep", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        n = draw(st.integers(50, 200_000))
        return ("[" * n + "]" * n if draw(st.booleans()) else nested_text(n)).encode()
    if kind == "big":
        return message(settings.APPLY_TASK, {"prompt": "q" * draw(st.integers(2_000, 1_500_000)), "target": "a"}).encode()
    task_id = draw(ids)
    if draw(st.booleans()):  # well formed around a random request: it reaches the task
        return json.dumps(envelope(draw(st.sampled_from(TASKS)), task_id, json_body(draw(requests)))).encode()
    item: dict[str, Any] = envelope(draw(st.sampled_from(TASKS) | json_values), task_id, draw(bodies()),
                                    draw(st.sampled_from(["application/json"] * 4 + ["application/x-python-serialize",
                                                                                     "application/x-yaml", ""])),
                                    draw(st.sampled_from(["utf-8"] * 4 + ["binary", "latin-1"])))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["headers", "properties", "top"]))
        if where == "headers" and isinstance(item.get("headers"), dict):
            item["headers"][draw(st.sampled_from(HEADER_KEYS))] = draw(json_values)
        elif where == "properties" and isinstance(item.get("properties"), dict):
            item["properties"][draw(st.sampled_from(PROPERTY_KEYS))] = draw(json_values)
        else:
            item[draw(st.sampled_from(["headers", "properties", "body", "content-type", "x"]))] = draw(json_values)
    encoded = json.dumps(item)
    return encoded.encode(draw(st.sampled_from(["utf-8"] * 8 + ["utf-16", "utf-32"])))


# -------------------------------------------------------------------------------------- a batch


@dataclass
class BatchResult:
    items: int
    ran: int = 0  # accepted and run: the request has a status record
    parked: int = 0  # in the dead-letter list
    unaccounted: list[str] = field(default_factory=list)  # neither: must stay empty
    worker_alive: bool = False
    log_problems: list[str] = field(default_factory=list)
    verify_ok: bool = False
    verify_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        return not self.unaccounted and self.worker_alive and not self.log_problems and self.verify_ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_batch(stack: Stack, batch: list[bytes], verify: bool = True) -> BatchResult:
    """Push `batch` raw, drain the queue, and account for every item (see the module doc)."""
    started = time.monotonic()
    result = BatchResult(items=len(batch))
    before = {e["id"] for e in stack.dead()}
    stack.push(*batch)
    stack.drain()
    parked = [deadletter.raw_item(e) for e in stack.dead() if e["id"] not in before]
    for raw in batch:
        if raw in parked:
            parked.remove(raw)
            result.parked += 1
            continue
        try:
            accepted = check_item(raw, settings.queue_name(NAME))
        except BadItem as exc:
            result.unaccounted.append(f"not a message ({exc}) yet not parked: {raw[:200]!r}")
            continue
        request = json.loads(base64.b64decode(accepted["body"]))[1]["request"]
        job = request.get("job") if isinstance(request, dict) else None  # a chunk reports under its job
        if not any(stack.status(key) for key in (accepted["headers"]["id"], job) if isinstance(key, str)):
            result.unaccounted.append(f"accepted but no status for {accepted['headers']['id']!r}: {raw[:200]!r}")
        else:
            result.ran += 1
    result.worker_alive = stack.worker.alive()
    result.log_problems = stack.log_problems()
    if verify:
        report = stack.verify()
        result.verify_ok, result.verify_errors = report["exit"] == 0 and report["ok"], report["errors"]
    result.seconds = round(time.monotonic() - started, 2)
    return result


__all__ = ["BatchResult", "Stack", "envelope", "items", "json_body", "message", "nested", "run_batch"]
