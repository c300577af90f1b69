"""The database can go away: a `Store` on the real PostgreSQL whose sessions are terminated, a
database that refuses connections for a while, a transaction cut in its middle, three processes
opening one new ledger at once, and a SQLite ledger briefly locked by another process.

What must hold: a dropped connection is re-opened at the next statement or transaction start
(with a log line, within a bounded number of tries); a transaction that was cut is never replayed
behind the caller's back (it fails, nothing of it is committed, the next one works); a writer gets
its lock back only if nobody took it meanwhile; schema creation never deadlocks.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import peewee as pw
import pytest
from test_serving_http import Server, wait_until  # noqa: I001 - tests/ is on sys.path (rootdir conftest)
from test_store import apply_edit, make_state

from memoir import MemoirConfig
from pipeline.local_redis import free_port
from store import FencingError, Store
from workers.runtime import Runtime

from .harness import REPO, WorkerProcess, child_env, edit_requests, last_json, memoir_config, run_cli, submit
from .postgres import Database, pg  # noqa: F401 - the fixture

REDIS = "redis://127.0.0.1:6379/5"  # the worker test's queue (conftest's redis_url fixture)
NAME = "pgmem"

pytestmark = pytest.mark.postgres


def reconnects(caplog: pytest.LogCaptureFixture) -> int:
    return sum("reconnected" in r.getMessage() for r in caplog.records)


def test_a_store_reconnects_after_its_sessions_are_terminated(pg: Database, tmp_path, caplog):
    """Defect 4: after pg_terminate_backend every query failed with 'connection already closed'."""
    import torch

    caplog.set_level(logging.INFO, logger="store")
    store = Store.open(pg.url, tmp_path / "tensors")
    store.create_memory("default", make_state(), "synthetic")
    weight = torch.zeros(8, 40)
    apply_edit(store, weight, 1)
    assert pg.terminate() >= 1
    assert store.get_memory("default").version == 1  # a read outside a transaction
    assert reconnects(caplog) == 1
    assert pg.terminate() >= 1
    apply_edit(store, weight, 2)  # writes: each transaction starts on a live session
    assert reconnects(caplog) == 2
    # the writer lock (an advisory lock of the session) is taken again with the session
    store.writer_lock("default")
    assert pg.terminate() >= 1
    apply_edit(store, weight, 3)
    assert [e.status for e in store.edits("default")] == ["applied"] * 3
    assert store._locks["default"].held
    assert store.verify("default").ok
    store.close()


def test_a_transaction_cut_in_its_middle_is_not_replayed(pg: Database, tmp_path):
    store = Store.open(pg.url, tmp_path / "tensors")
    info = store.t.StoreInfo
    with pytest.raises(pw.DatabaseError):
        with store.db.atomic():
            info.create(key="first", value="1")
            pg.terminate()
            info.create(key="second", value="2")  # the session is gone: this must fail, not be redone alone
    assert info.get_or_none(info.key == "first") is None and info.get_or_none(info.key == "second") is None
    # a write outside a transaction that meets a dead session may have run: it is not sent again either
    pg.terminate()
    with pytest.raises(pw.DatabaseError):
        info.create(key="third", value="3")
    assert info.get_or_none(info.key == "third") is None
    info.create(key="fourth", value="4")  # the next statement runs on a new session
    assert info.get_or_none(info.key == "fourth").value == "4"
    store.close()


def test_a_writer_cut_off_while_another_took_its_lock_is_fenced(pg: Database, tmp_path):
    import torch

    first = Store.open(pg.url, tmp_path / "tensors", actor="first")
    first.create_memory("default", make_state(), "synthetic")
    first.writer_lock("default")
    pg.terminate()  # first's session, and with it its advisory lock, is gone
    second = Store.open(pg.url, tmp_path / "tensors", actor="second")
    second.writer_lock("default")
    apply_edit(second, torch.zeros(8, 40), 1)
    with pytest.raises(FencingError):
        apply_edit(first, torch.zeros(8, 40), 2)
    assert [e.actor for e in second.events(name="default")][-1] == "second"
    second.close()
    first.close()


def test_a_database_that_comes_back_within_the_retries_is_waited_for(pg: Database, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="store")
    store = Store.open(pg.url, tmp_path / "tensors")
    store.create_memory("default", make_state(), "synthetic")
    pg.refuse()  # a restart: no session for a moment
    back = threading.Timer(1.5, pg.allow)
    back.start()
    started = time.monotonic()
    assert store.get_memory("default").version == 0
    back.join()
    assert 1.0 < time.monotonic() - started < 15
    assert any("unavailable" in r.getMessage() for r in caplog.records) and reconnects(caplog) == 1
    # gone for longer than the retries: a clear error, soon, and the store works once it is back
    pg.refuse()
    started = time.monotonic()
    with pytest.raises(pw.OperationalError):
        store.get_memory("default")
    assert time.monotonic() - started < 30
    pg.allow()
    assert store.get_memory("default").name == "default"
    store.close()


OPENER = """
import sys, time
from store import Store
url, tensors, start, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
failed = 0
for _ in range(count):
    try:
        Store.open(url, tensors).close()
    except Exception as exc:
        failed += 1
        print(type(exc).__name__, exc, file=sys.stderr)
print(failed)
"""


def test_concurrent_opens_of_a_new_ledger_never_fail(pg: Database, tmp_path):
    """Defect 5: 3 processes x 30 opens, 45 of 90 failed with 'deadlock detected'."""
    start = time.time() + 3  # all three import first, then open together
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, pg.url, str(tmp_path / "tensors"), str(start), "30"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [int(out.strip().splitlines()[-1]) if out.strip() else 30 for out, _ in outs]
    assert failed == [0, 0, 0], "\n".join(err[-2000:] for _, err in outs)
    with Store.open(pg.url, tmp_path / "tensors") as store:
        assert store.t.StoreInfo.get(store.t.StoreInfo.key == "schema_version").value == "1"


def test_a_sqlite_ledger_briefly_locked_by_another_process_is_waited_for(tmp_path):
    import torch

    store = Store.open(tmp_path / "store")
    store.create_memory("default", make_state(), "synthetic")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(2); db.execute('COMMIT')\n"),
        str(tmp_path / "store" / "ledger.db")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    apply_edit(store, torch.zeros(8, 40), 1)
    assert time.monotonic() - started > 1.0  # it waited for the lock, and then wrote
    assert holder.wait(timeout=30) == 0
    assert [e.status for e in store.edits("default")] == ["applied"]
    store.close()


# ------------------------------------------------------------------ real processes: server, worker, CLI


def test_the_server_waits_for_the_database_and_follows_it_again(pg: Database, tmp_path, zsre):
    """Defect 4 in `memoir serve`: after pg_terminate_backend it logged failed reloads every 2 s
    forever while /healthz said 200 and "following": true."""
    tensors = str(tmp_path / "tensors")
    writer = Runtime.open("builtin", pg.url, name=NAME, config=MemoirConfig(check_size=1, threshold=0.9, n_iter=4),
                          tensor_dir=tensors)
    served_edits = lambda: [e["target"] for e in server.get("/v1/memory")["edits"]]  # noqa: E731
    pg.refuse()  # the database is down when the server starts
    env = child_env({"MEMOIR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "MEMOIR_DB_RETRY_SECONDS": "120"})
    server = Server(["serve", "--model", "builtin", "--name", NAME, "--store", pg.url, "--tensors", tensors,
                     "--port", "0", "--poll", "0.5"], env, tmp_path / "serve.log")
    try:
        server.url = server.ready("memoir serve listening:").split()[3]
        assert server.request("/readyz") == (503, {"status": "loading"})
        assert server.get("/healthz")["status"] == "loading"
        status, answer = server.request("/v1/completions", {"prompt": "x"})
        assert status == 503 and answer["error"]["code"] == "loading"
        pg.allow()
        server.ready("memoir serve ready:")
        assert server.get("/readyz")["status"] == "ready" and server.get("/healthz")["following"]
        # every session killed: the writer and the server reconnect; the new edit is served
        writer.store.get_memory(NAME)  # the writer's session (it lost the last one to refuse())
        wait_until(lambda: pg.sessions() >= 2, 10, "the server's follower reads the ledger")
        assert pg.terminate() >= 2
        assert writer.apply_request({"prompt": zsre[0]["src"], "target": zsre[0]["alt"]})["status"] == "applied"
        seconds = wait_until(lambda: served_edits() == [zsre[0]["alt"]], 10, "the server follows after a terminate")
        # the database gone for a while: /healthz says so (not following, the lag growing); serving goes on
        pg.refuse()
        wait_until(lambda: not server.get("/healthz")["following"], 20, "/healthz reports not following")
        health = server.get("/healthz")
        assert health["status"] == "ok" and health["lag_s"] > 1.0, health
        assert server.get("/readyz")["status"] == "ready" and served_edits() == [zsre[0]["alt"]]
        pg.allow()
        wait_until(lambda: server.get("/healthz")["following"], 20, "following again once the database is back")
        assert writer.apply_request({"prompt": zsre[1]["src"], "target": zsre[1]["alt"]})["status"] == "applied"
        wait_until(lambda: served_edits() == [zsre[0]["alt"], zsre[1]["alt"]], 10, "the next edit is served")
        log = (tmp_path / "serve.log").read_text()
        assert "reconnected to the ledger database" in log and "reading the ledger of" in log
        print(f"served the edit {seconds:.1f} s after the terminate; lag reported {health['lag_s']} s")
    finally:
        pg.allow()
        server.stop()
        writer.close()


def test_the_worker_goes_on_after_its_sessions_are_terminated(pg: Database, tmp_path, redis_url, client):
    """Defect 4 in `memoir worker`: the next edit failed on the closed connection and the worker stopped."""
    tensors = str(tmp_path / "tensors")
    Runtime.open("builtin", pg.url, name=NAME, config=memoir_config(), tensor_dir=tensors).close()
    worker = WorkerProcess(pg.url, {"MEMOIR_REDIS_URL": redis_url}, tmp_path / "worker.log", name=NAME,
                           args=("--tensors", tensors)).ready()
    requests = edit_requests(3, "pg")
    try:
        assert submit(client, requests[0], NAME).wait(timeout=300)["status"] == "applied"
        assert pg.terminate() >= 1  # between edits: the worker's session and its advisory lock go
        assert submit(client, requests[1], NAME).wait(timeout=300)["status"] == "applied"
        handle = submit(client, requests[2], NAME)
        with Store.open(pg.url, tensors) as store:  # during an edit (training: no transaction open)
            wait_until(lambda: (e := store.edit_by_request(requests[2]["request_id"])) is not None
                       and e.status == "applying", 120, "the third edit is applying")
            pg.terminate()
            assert handle.wait(timeout=300)["status"] == "applied"
            assert [e.status for e in store.edits(NAME)] == ["applied"] * 3
        assert worker.alive()
        log = worker.log_text()
        assert "reconnected to the ledger database" in log and "taken again on a new database session" in log
        verify = run_cli("ledger", "verify", "--store", pg.url, "--json", env={"MEMOIR_TENSORS": tensors})
        assert verify.returncode == 0 and last_json(verify.stdout)["ok"], verify.stdout + verify.stderr
    finally:
        worker.stop()


def test_the_cli_waits_for_a_restarting_database_within_bounds(pg: Database, tmp_path):
    with Store.open(pg.url, tmp_path / "tensors") as store:
        store.create_memory("default", make_state(), "synthetic")
    env = {"MEMOIR_TENSORS": str(tmp_path / "tensors"), "MEMOIR_DB_RETRY_SECONDS": "60"}
    pg.refuse()
    back = threading.Timer(2.0, pg.allow)
    back.start()
    started = time.monotonic()
    done = run_cli("ledger", "list", "--store", pg.url, "--json", env=env)
    back.join()
    assert done.returncode == 0 and last_json(done.stdout) == [], done.stderr
    assert time.monotonic() - started > 2.0 and "unavailable" in done.stderr
    # down for longer than the retries: a clear error within the bound, no traceback, exit 3 (service)
    pg.refuse()
    started = time.monotonic()
    done = run_cli("ledger", "list", "--store", pg.url, env={**env, "MEMOIR_DB_RETRY_SECONDS": "2"})
    assert done.returncode == 3 and "error: cannot open the store" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60
    pg.allow()
