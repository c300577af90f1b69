"""`memoir rollback`, `memoir replay` and `memoir ledger diff` from the real CLI: in-process on a
store no worker holds, and through a real Redis and a real worker process when one serves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from memoir import MemoirConfig
from memoir.tinymodel import load_pretrained_pair
from pipeline import settings
from pipeline.client import Client
from store import APPLIED, ROLLED_BACK, Store
from workers.demo import WorkerProcess
from workers.runtime import Runtime

pytestmark = pytest.mark.slow

REDIS = os.environ.get("MEMOIR_ROLLBACK_REDIS_URL", "redis://127.0.0.1:6379/13")
# `rollback --json`: one shape whatever the path (in-process, through the queue, waited for or not)
SUMMARY_KEYS = {"rolled_back", "edits", "checked", "replayed", "seconds", "status", "via", "request_ids"}


@pytest.fixture(scope="module")
def six(tmp_path_factory, trained_llama_path, zsre):
    """A store with 6 applied edits (ids and seqs 1..6)."""
    path = tmp_path_factory.mktemp("six") / "store"
    model, tokenizer = load_pretrained_pair(trained_llama_path)
    with Runtime.open(model, path, tokenizer=tokenizer, config=MemoirConfig(n_iter=5, check_size=1)) as runtime:
        for n, r in enumerate(zsre[60:66]):
            outcome = runtime.apply_request({"prompt": r["src"], "target": r["alt"], "request_id": f"c-{n}",
                                             "metadata": {"subject": r["subject"]}})
            assert outcome["status"] == APPLIED
    return path


def memoir(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, input=stdin)


def last_json(result: subprocess.CompletedProcess):
    return json.loads(result.stdout.strip().splitlines()[-1])


def statuses(path) -> dict[int, str]:
    with Store.open(path) as store:
        return {e.id: e.status for e in store.edits("default")}


def test_rollback_in_process_and_the_ledger_diff(six, tmp_path):
    shutil.copytree(six, tmp_path / "store")
    path = str(tmp_path / "store")

    done = memoir("rollback", "2", "--store", path, "--reason", "wrong", "--json")
    assert done.returncode == 0, done.stderr
    summary = last_json(done)
    assert summary.keys() == SUMMARY_KEYS and summary["rolled_back"] == 2 and 2 not in summary["checked"]
    assert summary["edits"] == [2] and summary["status"] == "done" and summary["via"] == "in-process"
    assert summary["request_ids"] == []
    assert set(summary["replayed"]) <= set(summary["checked"]) <= {1, 3, 4, 5, 6}
    assert statuses(path)[2] == ROLLED_BACK

    for args, message in [(["2"], "already rolled back"), (["999"], "no edit 999"),
                          (["--prompt", "nobody asked this"], "no live edit"), ([], "give one of")]:
        refused = memoir("rollback", *args, "--store", path)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    assert list(statuses(path).values()).count(ROLLED_BACK) == 1

    with Store.open(path) as store:
        prompt = store.edit(4).prompt
    declined = memoir("rollback", "--prompt", prompt.upper(), "--store", path, stdin="n\n")
    assert declined.returncode != 0 and "edit 4" in declined.stderr and statuses(path)[4] == APPLIED
    retracted = memoir("rollback", "--prompt", prompt, "--store", path, "--json")  # --json: no question
    assert retracted.returncode == 0, retracted.stderr
    assert last_json(retracted)["rolled_back"] == [4] and statuses(path)[4] == ROLLED_BACK
    assert last_json(retracted).keys() == SUMMARY_KEYS

    diff = memoir("ledger", "diff", "0", "6", "--store", path, "--json")
    assert diff.returncode == 0, diff.stderr
    report = last_json(diff)
    assert [e["id"] for e in report["added"]] == [1, 2, 3, 4, 5, 6]
    assert [(e["id"], e["reason"]) for e in report["rolled_back"]] == [(2, "wrong"), (4, "retracted")]
    assert report["live"] == {"from": 0, "to": 4} and report["net"]["added"] == [1, 3, 5, 6]
    earlier = last_json(memoir("ledger", "diff", "2", "4", "--store", path, "--json"))
    assert [e["id"] for e in earlier["added"]] == [3, 4] and earlier["rolled_back"] == []
    assert earlier["net"] == {"added": [3, 4], "removed": [], "changed": []}
    text = memoir("ledger", "diff", "0", "6", "--store", path)
    assert text.returncode == 0 and "- edit 2 (seq 2) rolled back: wrong" in text.stdout
    assert memoir("ledger", "diff", "5", "3", "--store", path).returncode != 0
    assert memoir("ledger", "diff", "0", "60", "--store", path).returncode != 0

    verified = memoir("ledger", "verify", "--store", path, "--json")
    assert verified.returncode == 0 and last_json(verified)["ok"]


def test_rollback_through_the_queue_of_a_worker(six, tmp_path, redis_url, trained_llama_path):
    shutil.copytree(six, tmp_path / "store")
    path = str(tmp_path / "store")
    # a short visibility timeout makes the worker split an exact rollback into chunks of ~3 s
    env = {**os.environ, "MEMOIR_REDIS_URL": redis_url, "MEMOIR_VISIBILITY_TIMEOUT": "10"}
    worker = WorkerProcess(["--model", str(trained_llama_path), "--store", path], env, tmp_path / "worker.log")
    worker.start(timeout=300)
    client = Client(redis_url)
    try:
        done = memoir("rollback", "3", "--store", path, "--wait", "--json", env=env)
        assert done.returncode == 0, done.stderr + worker.log_path.read_text()[-3000:]
        summary = last_json(done)
        assert summary.keys() == SUMMARY_KEYS and summary["rolled_back"] == 3 and summary["edits"] == [3]
        assert summary["status"] == "done" and summary["via"] == "worker" and len(summary["request_ids"]) == 1
        assert statuses(path)[3] == ROLLED_BACK
        # refused before anything is sent
        again = memoir("rollback", "3", "--store", path, "--wait", env=env)
        assert again.returncode != 0 and "already rolled back" in again.stderr

        exact = memoir("rollback", "c-1", "--exact", "--store", path, "--wait", "--json", env=env)  # by request id
        assert exact.returncode == 0, exact.stderr
        assert last_json(exact)["rolled_back"] == 2 and last_json(exact)["replayed"] == [4, 5, 6]

        queued = memoir("rollback", "5", "--store", path, "--json", env=env)
        assert queued.returncode == 0 and last_json(queued)["status"] == "queued"
        assert last_json(queued).keys() == SUMMARY_KEYS and last_json(queued)["rolled_back"] == 5
        assert last_json(queued)["checked"] is None and last_json(queued)["via"] == "worker"
        request_id = last_json(queued)["request_ids"][0]
        assert client.wait([request_id], timeout=300)[request_id]["status"] == "done"

        # a replay through the queue, checked against the stored and the live memory
        replay_id = f"replay-{uuid.uuid4().hex}"
        client.app.send_task(settings.REPLAY_TASK, kwargs={"request": {"name": "default", "mode": "sum"}},
                             task_id=replay_id, queue=settings.queue_name("default"))
        deadline = time.monotonic() + 300
        record = None
        while time.monotonic() < deadline:
            raw = client.redis.get(settings.status_key(replay_id))
            record = json.loads(raw) if raw else None
            if record and record["status"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert record and record["status"] == "done" and record["ok"] and record["live_ok"], record
        assert worker.alive()
    finally:
        worker.stop(timeout=30)
        client.close()
    assert statuses(path) == {1: APPLIED, 2: ROLLED_BACK, 3: ROLLED_BACK, 4: APPLIED, 5: ROLLED_BACK, 6: APPLIED}
    verified = memoir("ledger", "verify", "--store", path, "--json")
    assert verified.returncode == 0 and last_json(verified)["ok"], verified.stdout
