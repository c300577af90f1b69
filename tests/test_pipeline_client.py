"""The producer side against a real Redis (a dedicated DB, flushed per test), without a worker:
what reaches the queue, idempotency and conflicts, statuses, waiting, refusals, auth."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib
from click.testing import CliRunner

from pipeline import settings
from pipeline.cli import main
from pipeline.client import BrokerError, Client, ConflictError, UnknownRequestError, WaitTimeout
from pipeline.local_redis import LocalRedis, free_port
from pipeline.schema import RequestError

REDIS = os.environ.get("MEMOIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def queued_messages(client: Client, name: str = "default") -> list[dict]:
    return [json.loads(raw) for raw in client.redis.lrange(settings.queue_name(name), 0, -1)]


def publish_status(client: Client, request_id: str, **fields) -> None:
    """What the worker's mirror does (workers/status_mirror.py), written by hand here."""
    record = {"request_id": request_id, "name": "default", "kind": "edit", **fields}
    client.redis.set(settings.status_key(request_id), json.dumps(record))


def test_the_client_and_the_producer_cli_import_no_torch(redis_url):
    code = (
        "import sys\n"
        "from pipeline.client import Client\n"
        "import pipeline.commands, pipeline.cli\n"
        f"c = Client({redis_url!r}); h = c.submit('q?', 'a', request_id='no-torch-probe')\n"
        "c.redis.delete('memoir:request:no-torch-probe', 'memoir:status:no-torch-probe', 'memoir.default')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'memoir', 'workers'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_submit_puts_one_json_message_on_the_memory_queue(client):
    handle = client.submit("Who wrote Hamlet?", "Marlowe", rephrases=["Hamlet's author?"], name="shakespeare",
                           metadata={"source": "test"})
    assert not handle.duplicate and handle.name == "shakespeare"
    [message] = queued_messages(client, "shakespeare")
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == settings.APPLY_TASK
    assert message["headers"]["id"] == handle.request_id  # the task id is the request id
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [] and kwargs["request"] == {
        "request_id": handle.request_id, "prompt": "Who wrote Hamlet?", "target": "Marlowe",
        "rephrases": ["Hamlet's author?"], "metadata": {"source": "test"}, "name": "shakespeare"}
    assert client.status(handle.request_id)["status"] == "submitted"
    assert client.queue_length("shakespeare") == 1 and client.queue_length("default") == 0


def test_the_same_id_and_payload_is_sent_once_another_payload_is_a_conflict(client):
    first = client.submit("q?", "a", request_id="req-1")
    again = client.submit("q?", "a", request_id="req-1")
    assert again.duplicate and again.request_id == first.request_id
    assert client.queue_length() == 1
    for change in ({"target": "b"}, {"rephrases": ["r"]}, {"name": "other"}):
        kwargs = {"prompt": "q?", "target": "a", **change}
        with pytest.raises(ConflictError) as info:
            client.submit(kwargs.pop("prompt"), kwargs.pop("target"), request_id="req-1", **kwargs)
        assert info.value.field == "request_id"
    assert client.queue_length() == 1 and client.queue_length("other") == 0
    assert client.status("req-1")["status"] == "submitted"


def test_a_submit_that_died_before_sending_is_sent_by_its_retry(client):
    """The claim exists but was never marked sent (the producer died in between): a retry sends it."""
    from pipeline.schema import validate_edit

    request = validate_edit({"prompt": "q?", "target": "a", "request_id": "req-2"})
    client.redis.set(settings.request_key("req-2"), f"default {request.payload_hash()}")
    handle = client.submit("q?", "a", request_id="req-2")
    assert handle.duplicate and client.queue_length() == 1
    client.submit("q?", "a", request_id="req-2")
    assert client.queue_length() == 1


def test_bad_requests_are_refused_before_anything_reaches_redis(client):
    for prompt, target, kwargs in (("", "a", {}), ("q", "  ", {}), ("q" * 5000, "a", {}), (b"\xff", "a", {}),
                                   (3, "a", {}), ("q", "a", {"rephrases": "r"}), ("q", "a", {"name": "x y"}),
                                   ("q", "a", {"request_id": "bad id"}), ("q", "a", {"metadata": [1]})):
        with pytest.raises(RequestError):
            client.submit(prompt, target, **kwargs)
    assert client.redis.dbsize() == 0


def test_wait_returns_once_the_worker_reports_a_final_status(client):
    handle = client.submit("q?", "a")
    with pytest.raises(WaitTimeout) as info:
        handle.wait(timeout=0.3)
    assert info.value.statuses[handle.request_id]["status"] == "submitted"

    def worker_side() -> None:
        time.sleep(0.2)
        publish_status(client, handle.request_id, status="applying", edit_id=4, seq=4)
        time.sleep(0.2)
        publish_status(client, handle.request_id, status="applied", edit_id=4, seq=4, scores={"rel": 1.0})

    thread = threading.Thread(target=worker_side)
    thread.start()
    record = handle.wait(timeout=10)
    thread.join()
    assert record["status"] == "applied" and record["seq"] == 4 and record["scores"] == {"rel": 1.0}
    assert client.status(handle.request_id) == record
    with pytest.raises(UnknownRequestError):
        client.status("never-submitted")


def test_rollback_requests_travel_the_memory_queue(client):
    client.submit("q?", "a", name="m1")
    handle = client.rollback(7, reason="outdated", name="m1")
    edit, rollback = queued_messages(client, "m1")[::-1]  # LPUSH: the newest first
    assert edit["headers"]["task"] == settings.APPLY_TASK
    assert rollback["headers"]["task"] == settings.ROLLBACK_TASK and rollback["headers"]["id"] == handle.request_id
    _, kwargs, _ = json.loads(base64.b64decode(rollback["body"]))
    assert kwargs["request"] == {"request_id": handle.request_id, "edit": 7, "reason": "outdated",
                                 "exact": False, "name": "m1"}
    assert client.status(handle.request_id)["kind"] == "rollback"


def test_an_unreachable_redis_is_a_clear_error_without_the_password():
    client = Client(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(BrokerError) as info:
        client.submit("q?", "a")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


@pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs redis-server")
def test_a_password_protected_redis_works_and_a_wrong_password_is_refused():
    with LocalRedis() as local:
        redis_lib.Redis.from_url(local.url).config_set("requirepass", "s3cret")
        good = Client(f"redis://:s3cret@127.0.0.1:{local.port}/0")
        handle = good.submit("q?", "a")
        assert good.status(handle.request_id)["status"] == "submitted" and good.queue_length() == 1
        with pytest.raises(BrokerError) as info:
            Client(f"redis://:wrong@127.0.0.1:{local.port}/0").submit("q?", "a")
        assert "wrong" not in str(info.value)
        good.close()


# ---------------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_submit_refuses_bad_input_and_sends_nothing(client, tmp_path):
    bad_file = tmp_path / "edits.jsonl"
    bad_file.write_text('{"src": "q1?", "alt": "a1", "rephrase": "r"}\n{"prompt": "q2?", "target": ""}\n')
    for args, field in ((["--prompt", " ", "--target", "x"], "prompt"),
                        (["--prompt", "q", "--target", "x", "--id", "a b"], "request_id"),
                        (["--prompt", "q", "--target", "x", "--name", "a.b"], "name"),
                        (["--file", str(bad_file)], "line 2: target")):
        code, _out, err = run_cli("submit", *args)
        assert code != 0 and field in err, (args, err)
    assert client.redis.dbsize() == 0


def test_cli_submit_a_file_and_read_a_status(client, tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text('{"src": "q1?", "alt": "a1", "rephrase": "r1"}\n{"prompt": "q2?", "target": "a2", "id": "x-2"}\n')
    code, out, _ = run_cli("submit", "--file", str(path), "--name", "mem", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["submitted"] == 2 and summary["ids"][1] == "x-2"
    assert client.queue_length("mem") == 2

    code, out, _ = run_cli("status", "x-2", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["status"] == "submitted"
    code, _, err = run_cli("status", "nope")
    assert code != 0 and "nope" in err

    conflicting = tmp_path / "conflict.jsonl"
    conflicting.write_text('{"prompt": "q3?", "target": "a3"}\n{"prompt": "q2?", "target": "other", "id": "x-2"}\n')
    code, _, err = run_cli("submit", "--file", str(conflicting), "--name", "mem")
    assert code != 0 and "x-2" in err
    assert client.queue_length("mem") == 2  # the whole file was refused, its good line included


def test_cli_submit_wait_json_counts_outcomes(client):
    def worker_side() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            raw = client.redis.get(settings.status_key("w-1"))
            if raw and json.loads(raw)["status"] == "submitted":
                publish_status(client, "w-1", status="failed", edit_id=1, seq=1, reason="refused by the policy")
                return
            time.sleep(0.05)

    thread = threading.Thread(target=worker_side)
    thread.start()
    code, out, err = run_cli("submit", "--prompt", "q?", "--target", "a", "--id", "w-1", "--wait", "--json",
                             "--timeout", "20")
    thread.join()
    summary = json.loads(out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("submitted", "applied", "failed", "ids")} == \
        {"submitted": 1, "applied": 0, "failed": 1, "ids": ["w-1"]}
    assert summary["timed_out"] is False and summary["no_worker"] == ["default"]  # added keys (issue 14.2)
    assert code == 1 and "failed" in err  # a failed edit: exit status 1
