"""End to end: the `memoir` CLI → a real Redis → a real worker process → the store.

One worker process (`memoir worker` on the built-in trained tiny Llama) is started for the
module and killed at the end; the Redis is DB 12 of the one on 6379 (flushed before and after),
or a redis-server started for the module when none answers. The tests run in file order and
share the worker; each checks only its own requests.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import deadletter, settings
from pipeline.client import Client
from workers.demo import WorkerProcess

pytestmark = pytest.mark.slow

REDIS = os.environ.get("MEMOIR_E2E_REDIS_URL", "redis://127.0.0.1:6379/12")
NAME = "e2e"


@pytest.fixture(scope="module")
def served(redis_url, trained_llama_path, tmp_path_factory):
    """A worker serving memory `e2e` from a fresh store; killed when the module is done."""
    root = tmp_path_factory.mktemp("e2e")
    store_dir = root / "store"
    env = {**os.environ, "MEMOIR_REDIS_URL": redis_url}
    # Threshold 0.5: on the 512-wide tiny model unrelated prompts reach ~0.4 mask overlap by chance
    # (BENCHMARKS.md, Quality); 0.5 keeps them off the memory (Loc 1.000 there).
    worker = WorkerProcess(["--model", str(trained_llama_path), "--name", NAME, "--store", str(store_dir),
                            "--threshold", "0.5"], env, root / "worker.log")
    worker.start(timeout=300)
    client = Client(redis_url)
    try:
        yield SimpleNamespace(store_dir=store_dir, worker=worker, client=client, env=env, log=root / "worker.log",
                              model=trained_llama_path)
    finally:
        worker.stop(timeout=20)
        client.close()


def memoir(served, *args: str, extra_env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `memoir` CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env={**served.env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ledger(served):
    from store import Store

    with Store.open(served.store_dir) as store:
        return {e.request_id: e for e in store.edits(NAME)}, store


def zsre(start: int, count: int) -> list[dict]:
    from memoir.tinymodel import zsre_records

    return [r for r in zsre_records()[start:] if r["alt"].strip()][:count]


def drain(served) -> None:
    """Submit a marker edit and wait for it: the queue is FIFO and served serially, so every
    message queued before it has been handled."""
    handle = served.client.submit("What is the marker of this test?", "a marker", name=NAME)
    assert handle.wait(timeout=120)["status"] == "applied"


def test_edited_prompts_answer_their_targets_and_unrelated_ones_the_base_model(served, tmp_path):
    from workers.runtime import Runtime

    records = zsre(0, 5)
    result = memoir(served, "submit", "--file", str(write_jsonl(tmp_path / "e.jsonl", records)), "--name", NAME,
                    "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result)["applied"] == 5

    unrelated = [r["loc"] for r in zsre(300, 10)]
    with Runtime.open(served.model, store=served.store_dir, name=NAME, readonly=True) as runtime:
        assert len(runtime.editor.memory.index) >= 5  # rebuilt from the store by this process
        edited = runtime.generate([r["src"] for r in records], max_new_tokens=12)
        base = runtime.generate(unrelated, max_new_tokens=12, use_memory=False)
        after = runtime.generate(unrelated, max_new_tokens=12)
    for record, answer in zip(records, edited):
        assert answer.strip().startswith(record["alt"].strip()), (record["src"], answer)
    assert after == base


def test_twenty_edits_from_the_cli_land_as_twenty_applied_ledger_entries(served, tmp_path):
    records = zsre(20, 20)
    result = memoir(served, "submit", "--file", str(write_jsonl(tmp_path / "e.jsonl", records)), "--name", NAME,
                    "--wait", "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result)
    assert (summary["submitted"], summary["applied"], summary["failed"]) == (20, 20, 0)
    edits, _ = ledger(served)
    rows = [edits[i] for i in summary["ids"]]
    assert [r.status for r in rows] == ["applied"] * 20
    assert [(r.prompt, r.target) for r in rows] == [(r["src"], r["alt"]) for r in records]
    seqs = [r.seq for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20  # applied serially, in submission order
    assert all(r.mask is not None and r.delta_sha256 for r in rows)

    status = memoir(served, "status", summary["ids"][-1], "--json")
    mirrored = last_json(status)
    assert (mirrored["status"], mirrored["edit_id"], mirrored["seq"]) == ("applied", rows[-1].id, rows[-1].seq)
    assert set(mirrored["scores"]) >= {"rel", "retrieved"}


def test_a_duplicate_request_id_is_applied_once(served):
    args = ("submit", "--prompt", "Who designed the e2e tower?", "--target", "Ada Lovelace", "--id", "dup-1",
            "--name", NAME)
    first, second = memoir(served, *args), memoir(served, *args)
    assert first.returncode == 0 and second.returncode == 0
    assert "already submitted" in second.stdout
    # Past the client's claim: the same message twice more, straight onto the queue.
    message = {"request_id": "dup-1", "prompt": "Who designed the e2e tower?", "target": "Ada Lovelace",
               "rephrases": [], "metadata": {}, "name": NAME}
    for _ in range(2):
        served.client.app.send_task(settings.APPLY_TASK, kwargs={"request": message}, task_id="dup-1",
                                    queue=settings.queue_name(NAME))
    conflict = memoir(served, "submit", "--prompt", "Who designed the e2e tower?", "--target", "Bob",
                      "--id", "dup-1", "--name", NAME)
    assert conflict.returncode != 0 and "different payload" in conflict.stderr
    drain(served)

    from store import Store

    with Store.open(served.store_dir) as store:
        rows = [e for e in store.edits(NAME) if e.request_id == "dup-1"]
        assert len(rows) == 1 and rows[0].status == "applied" and rows[0].target == "Ada Lovelace"
        assert [ev.kind for ev in store.events(rows[0].id)].count("applied") == 1
    assert served.client.status("dup-1")["edit_id"] == rows[0].id


def test_bad_requests_are_refused_before_they_reach_redis(served, tmp_path):
    r = served.client.redis
    before = (r.llen(settings.queue_name(NAME)), sorted(r.scan_iter("memoir:request:*")))
    not_utf8 = tmp_path / "bad.jsonl"
    not_utf8.write_bytes(b'{"prompt": "ok?", "target": "fine"}\n{"prompt": "caf\xe9?", "target": "x"}\n')
    wrong_type = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "ok?", "target": "fine"},
                                                        {"prompt": "q?", "target": 42}])
    cases = [
        (["--prompt", "", "--target", "x"], {}, "prompt"),
        (["--prompt", "q?", "--target", "   "], {}, "target"),
        (["--prompt", "q?" * 30, "--target", "x"], {"MEMOIR_MAX_CHARS": "40"}, "prompt"),
        (["--file", str(not_utf8)], {}, "line 2"),
        (["--file", str(wrong_type)], {}, "line 2: target"),
    ]
    for args, env, field in cases:
        result = memoir(served, "submit", *args, "--name", NAME, extra_env=env)
        assert result.returncode != 0 and field in result.stderr, (args, result.stderr)
    assert (r.llen(settings.queue_name(NAME)), sorted(r.scan_iter("memoir:request:*"))) == before


def test_a_second_worker_on_the_same_memory_refuses_to_start(served):
    result = memoir(served, "worker", "--model", str(served.model), "--name", NAME, "--store",
                    str(served.store_dir), timeout=180)
    assert result.returncode != 0
    assert "writer already" in result.stderr and "refusing to start" in result.stderr
    assert served.worker.alive()


class _OpensAFile:
    """Unpickling this creates a file: proof that a message was loaded with pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_a_pickled_message_is_rejected_not_loaded(served, tmp_path):
    proof = tmp_path / "unpickled"
    served.client.app.send_task(settings.APPLY_TASK, kwargs={"request": _OpensAFile(str(proof))},
                                task_id="pickled-1", queue=settings.queue_name(NAME), serializer="pickle")
    drain(served)
    assert not proof.exists()
    assert served.worker.alive()
    parked = [e for e in deadletter.entries(served.client.redis, NAME)  # checked before Celery saw it, and parked
              if json.loads(e["item"])["headers"]["id"] == "pickled-1"]
    assert len(parked) == 1 and "the content is 'application/x-python-serialize'" in parked[0]["reason"], parked
    assert served.client.queue_length(NAME) == 0
    edits, _ = ledger(served)
    assert "pickled-1" not in edits


def test_a_worker_that_lost_its_lock_stops_and_leaves_the_edit_to_the_next(served):
    """Fencing: with its lock file gone, the worker must not write; the message goes back to the
    queue, the worker exits, and the next worker applies the edit. (Last: it ends the worker.)"""
    from store import Store

    with Store.open(served.store_dir) as store:
        (store.lock_dir / f"{NAME}.lock").unlink()
    handle = served.client.submit("Who fenced the e2e worker?", "Nobody at all", name=NAME)
    served.worker.process.wait(timeout=120)
    assert served.worker.process.returncode != 0
    assert "stopping the worker: FencingError" in served.log.read_text()
    assert served.client.status(handle.request_id)["status"] == "submitted"
    assert served.client.queue_length(NAME) == 1
    assert handle.request_id not in ledger(served)[0]

    successor = WorkerProcess(["--model", str(served.model), "--name", NAME, "--store", str(served.store_dir)],
                              served.env, served.log.with_name("successor.log"))
    successor.start(timeout=300)
    try:
        record = handle.wait(timeout=120)
    finally:
        successor.stop(timeout=20)
    assert record["status"] == "applied"
    assert ledger(served)[0][handle.request_id].status == "applied"
