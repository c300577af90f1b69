"""The CLI as a user meets it (issue 14, section 2), through the real `memoir` command in a
subprocess, a real Redis (DB 2) and real stores: read-only commands refuse a store that does
not exist, `submit` says when no worker serves the memory and `--wait` gives up after
`--timeout`, `memoir queue` shows each memory's queue and worker, the same flag means the same
thing on every command, options come from MEMOIR_* variables, and the exit statuses are 2
(invalid input), 1 (a failed edit) and 3 (a timeout or a service that does not answer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REDIS = os.environ.get("MEMOIR_CLI_REDIS_URL", "redis://127.0.0.1:6379/2")
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def memoir(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def last_json(result: subprocess.CompletedProcess):
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ read-only commands, no store


READ_ONLY = [["ledger", "list"], ["ledger", "show", "1"], ["ledger", "verify"], ["ledger", "diff", "0", "1"],
             ["ledger", "memories"], ["store", "compact"]]


@pytest.mark.parametrize("command", READ_ONLY, ids=lambda c: " ".join(c))
def test_read_only_commands_refuse_a_store_that_does_not_exist(command, tmp_path):
    missing = tmp_path / "no-such-store"
    done = memoir(*command, "--store", str(missing))
    assert done.returncode == 2, done.stderr
    assert f"no store at {missing}" in done.stderr
    assert not missing.exists()  # nothing was created
    url = f"sqlite:///{tmp_path / 'no-such.db'}"
    by_url = memoir(*command, "--store", url)
    assert by_url.returncode == 2 and "does not exist" in by_url.stderr, by_url.stderr
    assert not (tmp_path / "no-such.db").exists()
    by_env = memoir(*command, env={"MEMOIR_STORE": str(missing)})  # the default store, from the environment
    assert by_env.returncode == 2 and not missing.exists()


def test_a_database_without_a_ledger_is_refused_not_initialised():
    from tests.reliability.postgres import Database, available

    if not available():
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    import uuid

    db = Database(f"memoir_h2_{uuid.uuid4().hex[:12]}")
    db.admin(f'CREATE DATABASE "{db.name}"')
    try:
        done = memoir("ledger", "list", "--store", db.url)
        assert done.returncode == 2 and "has no ledger tables" in done.stderr, done.stderr
        import psycopg2

        conn = psycopg2.connect(db.url)
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            assert cursor.fetchone()[0] == 0  # no table was created
        finally:
            conn.close()
    finally:
        db.admin(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


def test_an_existing_store_is_still_read(tmp_path):
    from store import Store

    Store.open(tmp_path / "store").close()  # an empty but real store
    done = memoir("ledger", "list", "--store", str(tmp_path / "store"))
    assert done.returncode == 0 and "no edits" in done.stdout, done.stderr


# ------------------------------------------------------------------------ submit, queue, workers


def presence(url: str, name: str):
    """A worker's announcement in Redis, as `memoir worker` makes it (workers/status_mirror.py)."""
    from pipeline import settings
    from workers.status_mirror import Presence

    return Presence(settings.redis_client(url), name, {"model": "builtin", "store": "/tmp/x", "device": "cpu"},
                    every=5).start()


def test_submit_warns_when_no_worker_serves_the_memory(redis_url):
    env = {"MEMOIR_REDIS_URL": redis_url}
    alone = memoir("submit", "--prompt", "Who wrote Hamlet?", "--target", "Marlowe", "--name", "nowhere",
                   "--json", env=env)
    assert alone.returncode == 0, alone.stderr
    assert "warning: no worker serves memory 'nowhere'" in alone.stderr
    assert last_json(alone)["no_worker"] == ["nowhere"]
    announced = presence(redis_url, "served")
    try:
        served = memoir("submit", "--prompt", "Who wrote Hamlet?", "--target", "Marlowe", "--name", "served",
                        "--json", env=env)
    finally:
        announced.stop()
    assert served.returncode == 0 and "warning" not in served.stderr, served.stderr
    assert last_json(served)["no_worker"] == []


def test_wait_without_a_worker_fails_after_the_timeout_with_status_3(redis_url):
    env = {"MEMOIR_REDIS_URL": redis_url}
    started = time.monotonic()
    done = memoir("submit", "--prompt", "Who wrote Hamlet?", "--target", "Marlowe", "--name", "idle",
                  "--wait", "--timeout", "1", "--json", env=env)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 60
    assert "timed out" in done.stderr and "no worker serves memory 'idle'" in done.stderr
    summary = last_json(done)
    assert summary["timed_out"] is True and summary["applied"] == 0 and summary["submitted"] == 1
    # --wait is bounded by default
    assert "default: 600" in " ".join(memoir("submit", "--help").stdout.split())


def test_queue_shows_each_memory_its_length_and_its_worker(redis_url):
    env = {"MEMOIR_REDIS_URL": redis_url}
    for n in range(2):
        assert memoir("submit", "--prompt", f"Question {n}?", "--target", "a", "--name", "waiting",
                      env=env).returncode == 0
    announced = presence(redis_url, "working")
    try:
        listed = memoir("queue", "--json", env=env)
        text = memoir("queue", env=env)
        one = memoir("queue", "--name", "waiting", "--json", env=env)
    finally:
        announced.stop()
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in last_json(listed)}
    assert rows["waiting"]["queued"] == 2 and rows["waiting"]["worker"] is None
    assert rows["waiting"]["queue"] == "memoir.waiting" and rows["waiting"]["dead"] == 0
    assert rows["working"]["queued"] == 0 and rows["working"]["worker"]["model"] == "builtin"
    assert rows["working"]["worker"]["pid"] == os.getpid()
    assert text.returncode == 0 and "waiting" in text.stdout and "none" in text.stdout and "builtin" in text.stdout
    assert [row["name"] for row in last_json(one)] == ["waiting"]
    # the dead-letter subcommands are still there
    assert memoir("queue", "dead", "--name", "waiting", "--json", env=env).returncode == 0


# -------------------------------------------------------------------------------- exit statuses


def test_the_exit_statuses_are_documented_in_help():
    helped = " ".join(memoir("--help").stdout.split())
    assert "Exit status: 0 done; 1 an edit" in helped and "2 invalid input" in helped and "3 a timeout" in helped


def test_exit_status_2_for_invalid_input(redis_url, tmp_path):
    env = {"MEMOIR_REDIS_URL": redis_url}
    cases = [
        ("submit", "--prompt", " ", "--target", "a"),
        ("submit", "--prompt", "q", "--target", "a", "--name", "a/b"),
        ("status", "never-submitted"),
        ("queue", "retry", "no-such-entry"),
        ("queue", "--name", "a.b"),
        ("submit", "--prompt", "q"),  # a usage error (click's own 2)
    ]
    for args in cases:
        done = memoir(*args, env=env)
        assert done.returncode == 2, (args, done.returncode, done.stderr)
        assert done.stderr.strip(), args


@pytest.mark.parametrize("args", [["submit", "--prompt", "q", "--target", "a"], ["status", "x"], ["queue"],
                                  ["queue", "dead"]])
def test_exit_status_3_when_redis_does_not_answer(args):
    done = memoir(*args, env={"MEMOIR_REDIS_URL": DEAD_REDIS}, timeout=120)
    assert done.returncode == 3, (args, done.returncode, done.stderr)
    assert "127.0.0.1:1" in done.stderr


def test_exit_status_3_when_the_database_does_not_answer():
    done = memoir("ledger", "list", "--store", "postgresql://postgres@127.0.0.1:1/none",
                  env={"MEMOIR_DB_RETRY_SECONDS": "0"}, timeout=120)
    assert done.returncode == 3, done.stderr


def test_apply_reads_threshold_and_n_iter_and_says_2_for_bad_lines_1_for_a_failed_edit(tmp_path):
    from store import Store

    path = str(tmp_path / "store")
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"prompt": "What university did Watts Humphrey attend?", "target": "Michigan"}\n'
                     '{"prompt": "q?", "target": ""}\n')
    done = memoir("apply", "--model", "builtin", "--store", path, "--file", str(edits), "--threshold", "0.7",
                  "--n-iter", "3", "--device", "auto", "--dtype", "float32", "--json")
    assert done.returncode == 2, done.stderr  # one invalid line, skipped; the valid edit is in
    assert last_json(done)["applied"] == 1 and last_json(done)["invalid"] == 1
    with Store.open(path) as store:
        config = store.get_memory("default").config
    assert config["threshold"] == 0.7 and config["n_iter"] == 3
    failing = tmp_path / "failing.jsonl"
    failing.write_text('{"prompt": "Who wrote Hamlet?", "target": "Marlowe", "replaces": 999}\n')
    failed = memoir("apply", "--model", "builtin", "--store", path, "--file", str(failing), "--json")
    assert failed.returncode == 1, failed.stderr  # a replaces naming no live edit: the edit fails
    assert last_json(failed)["failed"] == 1
    refused = memoir("apply", "--model", "builtin", "--store", path, "--file", str(edits), "--threshold", "1.5")
    assert refused.returncode == 2 and "--threshold" in refused.stderr


# ------------------------------------------------------------------- the same flags everywhere


MODEL_COMMANDS = {
    "worker": ["--model", "builtin"],
    "apply": ["--model", "builtin", "--file", "{file}"],
    "generate": ["--model", "builtin", "q"],
    "eval": ["--model", "builtin", "--data", "{file}"],
    "rollback": ["1", "--store", "{store}"],
    "replay": ["--store", "{store}"],
    "serve": ["--model", "builtin", "--store", "{store}", "--port", "0"],
    "demo": ["--model", "builtin"],
}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_device_and_dtype_mean_the_same_on_every_command_that_loads_a_model(command, tmp_path):
    import torch

    helped = " ".join(memoir(command, "--help").stdout.split())
    assert "--device DEVICE" in helped and "'auto' is the GPU when there is one" in helped
    assert "--dtype [float32|bfloat16|float16]" in helped
    if command in ("worker", "apply", "eval"):
        assert "--threshold" in helped and "--n-iter" in helped
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: a missing device cannot be asked for as simply")
    (tmp_path / "edits.jsonl").write_text('{"prompt": "q", "target": "a"}\n')
    args = [a.replace("{file}", str(tmp_path / "edits.jsonl")).replace("{store}", str(tmp_path / "store"))
            for a in MODEL_COMMANDS[command]]
    started = time.monotonic()
    done = memoir(command, *args, "--device", "cuda:7", env={"MEMOIR_REDIS_URL": DEAD_REDIS})
    assert done.returncode == 2, done.stderr
    assert "Invalid value for '--device'" in done.stderr and "no CUDA device" in done.stderr
    assert time.monotonic() - started < 60  # refused when the command line is read, before any model loads
    assert not (tmp_path / "store").exists()
    bad = memoir(command, *args, "--dtype", "float8", env={"MEMOIR_REDIS_URL": DEAD_REDIS})
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def test_auto_is_the_gpu_when_there_is_one():
    import torch

    from pipeline.runtime_options import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError):
        resolve_device("bogus")


# ------------------------------------------------------------------ options from the environment


def test_options_are_read_from_memoir_environment_variables(tmp_path, redis_url):
    missing = tmp_path / "elsewhere"
    listed = memoir("ledger", "list", env={"MEMOIR_LEDGER_LIST_STORE": str(missing)})
    assert listed.returncode == 2 and f"no store at {missing}" in listed.stderr
    named = memoir("submit", "--prompt", "q", "--target", "a", env={"MEMOIR_SUBMIT_NAME": "a/b"})
    assert named.returncode == 2 and "name" in named.stderr
    as_json = memoir("submit", "--prompt", "q", "--target", "a", "--name", "envtest",
                     env={"MEMOIR_REDIS_URL": redis_url, "MEMOIR_SUBMIT_JSON": "1"})
    assert as_json.returncode == 0 and last_json(as_json)["submitted"] == 1
    # --help names each variable
    assert "env var: MEMOIR_WORKER_DEVICE" in " ".join(memoir("worker", "--help").stdout.split())
    assert "env var: MEMOIR_LEDGER_LIST_STORE" in " ".join(memoir("ledger", "list", "--help").stdout.split())
    # the command line wins over the environment
    explicit = memoir("ledger", "list", "--store", str(tmp_path / "other"),
                      env={"MEMOIR_LEDGER_LIST_STORE": str(missing)})
    assert f"no store at {tmp_path / 'other'}" in explicit.stderr


# ------------------------------------------------------------------------------------- the pins


def test_celery_and_kombu_are_the_pinned_versions_whose_internals_the_worker_patches():
    """workers/tasks.py subclasses kombu's Redis channel and wraps private methods: pyproject.toml
    pins celery and kombu to the tested minor versions, the installed ones satisfy the pins, and
    the internals it relies on are there."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from kombu import transport as kombu_transport
    from kombu.transport import redis as kombu_redis

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = {Requirement(r).name: Requirement(r).specifier for r in pyproject["project"]["dependencies"]}
    for package in ("celery", "kombu"):
        spec = pins[package]
        assert any(s.operator == "<" for s in spec), f"{package} is not pinned below the next minor version"
        assert version(package) in spec, (package, version(package), str(spec))
    assert callable(getattr(kombu_redis.Channel, "_brpop_read", None))
    assert callable(getattr(kombu_redis.QoS, "ack", None)) and callable(getattr(kombu_redis.QoS, "reject", None))
    assert isinstance(kombu_transport._transport_cache, dict) and "redis" in kombu_transport.TRANSPORT_ALIASES


def test_exit_status_2_for_what_the_store_does_not_hold(tmp_path):
    """(A ledger that fails verification exits 1: tests/test_cli_store.py.)"""
    from store import Store

    path = tmp_path / "store"
    Store.open(path).close()
    for args in (["ledger", "show", "99"], ["ledger", "memories", "--name", "nope"], ["ledger", "diff", "3", "1"],
                 ["ledger", "list", "--status", "nonsense"], ["store", "compact", "--name", "nope"]):
        done = memoir(*args, "--store", str(path))
        assert done.returncode == 2, (args, done.returncode, done.stderr)
