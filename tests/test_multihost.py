"""One memory, many hosts: a worker and two `memoir serve` replicas that share nothing on disk.

The ledger is a PostgreSQL database (`memoir_s3_<hex>`, dropped afterwards), the tensors are in
S3-compatible object storage (moto's standalone server over real HTTP, a fresh bucket), the queue
and the change notices are Redis DB 1. Each of the three processes runs in its own empty
directory, which is also its HOME and its MEMOIR_CACHE: it reaches the memory only through
PostgreSQL, the object storage and Redis. An edit submitted through the client is served by both
replicas within seconds; so is a rollback; a replica restarted later on another empty directory
loads the same snapshot. The tests run in file order.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from memoir import MemoirConfig
from objectstore import s3_server  # noqa: F401 (a fixture)
from pipeline.client import Client
from pipeline.local_redis import redis_for
from reliability.postgres import Database, available
from test_serving_http import Server, wait_until

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/1"
NAME = "shared"
CONFIG = MemoirConfig(check_size=1, threshold=0.9)  # as tests/test_serving_http (the tiny model)
RELOAD_SECONDS = 10.0  # "within seconds", from the worker's outcome to both replicas' new answer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


class HostProcess(Server):
    """A `memoir` command in its own directory (cwd, HOME, MEMOIR_CACHE), as on a host of its own."""

    def __init__(self, args: list[str], env: dict[str, str], home: Path, log: Path) -> None:
        home.mkdir(parents=True)
        self.home, self.log = home, log
        self.stderr = open(log, "w")
        env = {**env, "HOME": str(home), "MEMOIR_CACHE": str(home / ".cache" / "memoir")}
        self.popen = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=home, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def local_tensor_files(home: Path) -> list[Path]:
    """Anything of a memory on a host's disk: tensor files, a SQLite ledger, a store directory."""
    return [p for p in home.rglob("*") if p.suffix in (".safetensors", ".db") or p.name == "memoir-store"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, s3_server, zsre):  # noqa: F811 (s3_server is a fixture)
    if not available():
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    root = tmp_path_factory.mktemp("multihost")
    db = Database(f"memoir_s3_{uuid.uuid4().hex[:12]}")
    db.admin(f'CREATE DATABASE "{db.name}"')
    tensors = f"s3://{s3_server.bucket()}/memoir"
    processes: list[HostProcess] = []
    try:
        with redis_for(REDIS_URL) as (url, _):
            client = Client(url)
            client.redis.flushdb()
            env = {**os.environ, **s3_server.env, "MEMOIR_REDIS_URL": url, "PYTHONPATH": str(REPO),
                   "MEMOIR_STORE": db.url, "MEMOIR_TENSORS": tensors, "OMP_NUM_THREADS": "1"}
            for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
                env.pop(key, None)
            # the memory is made once, by a process of its own (nothing of it stays on this host)
            make = subprocess.run(
                [sys.executable, "-c", "import sys; from memoir import MemoirConfig; from workers.runtime import Runtime; "
                 "import json; config = MemoirConfig.from_dict(json.loads(sys.argv[3])); "
                 f"Runtime.open('builtin', sys.argv[1], name={NAME!r}, config=config, tensor_dir=sys.argv[2]).close()",
                 db.url, tensors, json.dumps(CONFIG.to_dict())],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert make.returncode == 0, make.stderr[-3000:]
            worker = HostProcess(["worker", "--model", "builtin", "--name", NAME], env, root / "worker", root / "worker.log")
            processes.append(worker)
            worker.ready("memoir worker ready:")
            serve = ["serve", "--model", "builtin", "--name", NAME, "--port", "0", "--poll", "30"]

            def server(label: str) -> HostProcess:
                process = HostProcess(serve, env, root / label, root / f"{label}.log")
                processes.append(process)
                return process.start()

            replicas = [server("replica-a"), server("replica-b")]
            yield SimpleNamespace(client=client, env=env, db=db, tensors=tensors, root=root, worker=worker,
                                  replicas=replicas, server=server, processes=processes, s3=s3_server)
            for process in reversed(processes):
                process.stop()
            client.redis.flushdb()
            client.close()
    finally:
        for process in reversed(processes):
            process.stop()
        db.admin(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


def served(replica: HostProcess) -> tuple[int, int, list[int]]:
    memory = replica.get("/v1/memory")
    return memory["seq"], memory["version"], [e["id"] for e in memory["edits"]]


def test_an_edit_is_served_by_both_replicas_within_seconds(hosts, zsre):
    a = zsre[0]
    bases = [r.text(a["src"], use_memory=False) for r in hosts.replicas]
    assert not bases[0].strip().startswith(a["alt"]) and bases[0] == bases[1]
    outcome = hosts.client.submit(a["src"], a["alt"], name=NAME, request_id="host-edit-a").wait(timeout=300)
    assert outcome["status"] == "applied", outcome
    hosts.edit_a = outcome["edit_id"]
    for replica in hosts.replicas:
        seconds = wait_until(lambda: replica.text(a["src"]).strip().startswith(a["alt"]), RELOAD_SECONDS,
                             f"{replica.log.stem} serves the edit")
        print(f"{replica.log.stem} served the edit {seconds:.2f} s after the worker's outcome")
        assert replica.complete(a["src"])["memoir"]["retrieved"] == [[outcome["edit_id"]]]
    assert served(hosts.replicas[0]) == served(hosts.replicas[1]) == (1, 1, [outcome["edit_id"]])


def test_a_rollback_is_served_by_both_replicas_within_seconds(hosts, zsre):
    a = zsre[0]
    base = hosts.replicas[0].text(a["src"], use_memory=False)
    outcome = hosts.client.rollback(hosts.edit_a, reason="test", name=NAME).wait(timeout=300)
    assert outcome["status"] == "done", outcome
    for replica in hosts.replicas:
        seconds = wait_until(lambda: replica.text(a["src"]) == base, RELOAD_SECONDS,
                             f"{replica.log.stem} serves the rollback")
        print(f"{replica.log.stem} served the rollback {seconds:.2f} s after the worker's outcome")
        assert replica.complete(a["src"])["memoir"]["retrieved"] == [[]]
    seq, version, edits = served(hosts.replicas[0])
    assert (seq, edits) == (1, []) and version >= 2
    assert served(hosts.replicas[1]) == (seq, version, edits)


def test_a_replica_restarted_on_an_empty_host_loads_the_same_snapshot(hosts, zsre):
    b = zsre[1]
    outcome = hosts.client.submit(b["src"], b["alt"], name=NAME, request_id="host-edit-b").wait(timeout=300)
    assert outcome["status"] == "applied", outcome
    survivor = hosts.replicas[1]
    wait_until(lambda: served(survivor)[0] == 2, RELOAD_SECONDS, "replica b follows edit b")
    hosts.replicas[0].stop()
    restarted = hosts.server("replica-a-restarted")
    assert served(restarted) == served(survivor) and served(restarted)[2] == [outcome["edit_id"]]
    assert restarted.get("/v1/memory")["reloads"] == 0  # loaded at start, not followed
    prompts = [b["src"], zsre[0]["src"], zsre[300]["src"]]
    assert [c["text"] for c in restarted.complete(prompts)["choices"]] == \
           [c["text"] for c in survivor.complete(prompts)["choices"]]
    assert restarted.text(b["src"]).strip().startswith(b["alt"])


def test_nothing_of_the_memory_is_on_a_host_and_the_ledger_verifies(hosts):
    for process in hosts.processes:
        assert local_tensor_files(process.home) == [], process.home
    objects = hosts.s3.client().list_objects_v2(Bucket=hosts.tensors.split("/")[2], Prefix="memoir/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert len([k for k in keys if "/deltas/" in k]) == 2 and any("/memory/" in k for k in keys)
    verify = subprocess.run([sys.executable, "-m", "pipeline.cli", "ledger", "verify", "--json"], cwd=hosts.root,
                            env=hosts.env, capture_output=True, text=True, timeout=120)
    report = json.loads(verify.stdout.strip().splitlines()[-1])
    assert verify.returncode == 0 and report["ok"], verify.stderr[-2000:]
