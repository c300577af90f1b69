"""Security, against one real worker on a private redis-server that requires a password (and
serves TLS only, `rediss://`, when this redis-server was built with TLS and openssl can make a
certificate; else plain `redis://` with the password).

- Only JSON is ever loaded: hand-made messages pushed straight onto the queue (pickle, YAML,
  pickle bytes labelled JSON, a broken envelope, wrong shapes, an unknown task, an over-long or
  control-laden request that skipped the client) are refused; nothing in them runs; the worker
  stays up and applies the next edit. (tests/test_e2e_pipeline.py shows Celery's own pickle
  path refused; these go around Celery's producer.)
- Request data is data: template strings are stored and answered verbatim, never formatted or
  evaluated; no eval/exec/unpickling/shell anywhere in the code (an AST scan).
- The Redis password never appears in the worker's output, the store's files, Redis's values or
  the CLI's errors; a client without the CA cannot talk to the TLS server.
- A store made by `memoir worker` under umask 022 is owner-only, WAL, locks and tensors included.
"""

from __future__ import annotations

import ast
import base64
import builtins
import json
import os
import pickle
import stat
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import deadletter, settings
from pipeline.client import BrokerError, Client
from store import Store

from .harness import NAME, REPO, RedisServer, WorkerProcess, make_tls, redis_supports_tls, run_cli
from .poison import envelope, json_body

pytestmark = pytest.mark.slow

PASSWORD = "pw-" + uuid.uuid4().hex  # unique: any occurrence anywhere is a leak
TEMPLATES = {"prompt": "What does {0.__class__.__mro__} say about %(password)s and ${MEMOIR_REDIS_URL}?",
             "target": "{{7*7}} {request_id!r} %s",
             "rephrases": ["__import__('os').system('touch /tmp/memoir-pwned')", "{prompt}"],
             "metadata": {"{x}": "%(y)s", "$(id)": "`id`"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    tls = make_tls(root / "tls") if redis_supports_tls() else None
    server = RedisServer(root / "redis", password=PASSWORD, tls=tls).start()
    saved_ca = os.environ.get("MEMOIR_REDIS_CA")
    os.environ.update({k: v for k, v in server.env.items() if k == "MEMOIR_REDIS_CA"})  # this process's client
    worker = WorkerProcess(root / "store", server.env, root / "worker.log",
                           args=("--tensors", str(root / "tensors"), "--n-iter", "3"))
    client = Client(server.url)
    old_umask = os.umask(0o022)  # the worker makes the store and the memory itself, under a permissive umask
    try:
        try:
            worker.ready()
        finally:
            os.umask(old_umask)
        yield SimpleNamespace(root=root, server=server, worker=worker, client=client, tls=tls)
    finally:
        worker.stop()
        client.close()
        server.kill()
        os.environ.pop("MEMOIR_REDIS_CA", None)
        if saved_ca is not None:
            os.environ["MEMOIR_REDIS_CA"] = saved_ca


def drain(stack) -> dict:
    """A marker edit through the queue: once it is applied, everything queued before was handled."""
    record = stack.client.submit("What is the marker of this test?", "a marker", name=NAME).wait(timeout=300)
    assert record["status"] == "applied", record
    return record


def ledger_ids(stack) -> dict[str, str]:
    with Store.open(stack.root / "store", stack.root / "tensors") as store:
        return {e.request_id: e.status for e in store.edits(NAME)}


# ---------------------------------------------------------------------------- JSON only


class OpensAFile:
    """Loading this with pickle (or YAML's python tags) creates a file: proof it was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def raw_envelope(task: str, task_id: str, body: bytes, content_type: str, encoding: str = "binary") -> str:
    return json.dumps(envelope(task, task_id, body, content_type, encoding))


def test_messages_that_are_not_json_are_rejected_not_loaded(stack, tmp_path):
    proofs = {kind: tmp_path / f"loaded-by-{kind}" for kind in ("pickle", "pickle-as-json", "yaml")}
    pickled = pickle.dumps(((), {"request": OpensAFile(str(proofs["pickle"]))}, {}))
    yaml_text = f"- []\n- request: !!python/object/apply:builtins.open ['{proofs['yaml']}', 'w']\n- {{}}\n"
    raw = {
        "raw-pickle": raw_envelope(settings.APPLY_TASK, "raw-pickle", pickled, "application/x-python-serialize"),
        "raw-pickle-as-json": raw_envelope(settings.APPLY_TASK, "raw-pickle-as-json",
                                           pickle.dumps(((), {"request": OpensAFile(str(proofs["pickle-as-json"]))}, {})),
                                           "application/json", "utf-8"),
        "raw-yaml": raw_envelope(settings.APPLY_TASK, "raw-yaml", yaml_text.encode(), "application/x-yaml", "utf-8"),
        "raw-unknown-task": raw_envelope("memoir.not_a_task", "raw-unknown-task",
                                         json_body({"prompt": "q?", "target": "a"}), "application/json", "utf-8"),
    }
    queue = settings.queue_name(NAME)
    r = stack.client.redis
    for message in raw.values():
        r.lpush(queue, message)
    r.lpush(queue, "this is not a message at all")
    r.lpush(queue, json.dumps({"body": 5}))
    drain(stack)
    assert stack.worker.alive(), stack.worker.log_text()[-3000:]
    assert not any(p.exists() for p in proofs.values()), "a message was unpickled or YAML-loaded"
    assert not set(raw) & set(ledger_ids(stack))
    parked = [e["reason"] for e in deadletter.entries(r, NAME)]  # none reached Celery: each was parked
    assert len(parked) == len(raw) + 2, parked
    assert sum("the content is 'application/x-python-serialize'" in p for p in parked) == 1
    assert sum("the content is 'application/x-yaml'" in p for p in parked) == 1
    assert sum("the body is not valid UTF-8" in p for p in parked) == 1  # pickle bytes labelled JSON
    assert sum("headers.task is not valid" in p for p in parked) == 1


@pytest.mark.parametrize("request_, reason", [
    (["a", "list"], "not a JSON object"),
    ({"prompt": "q" * 50_000, "target": "a"}, "prompt: is 50000 characters long"),
    ({"prompt": "Who?\x1b]0;owned\x07", "target": "a"}, "prompt: contains the control character U+001B"),
    ({"prompt": "Who?", "target": "a", "rephrases": ["r"] * 1000}, "rephrases: has 1000 entries"),
    ({"prompt": "Who?", "target": "a", "metadata": {"blob": "x" * 100_000}}, "metadata: is 100"),
])
def test_a_json_message_that_skipped_the_client_is_refused_and_recorded_at_most_as_failed(stack, request_, reason):
    """The worker re-checks what the client checks: a hostile producer writing straight to Redis
    gets a `failed` status with the reason, the ledger gets at most a failed row."""
    task_id = f"bypass-{uuid.uuid4().hex[:8]}"
    stack.client.redis.lpush(settings.queue_name(NAME), raw_envelope(settings.APPLY_TASK, task_id, json_body(request_),
                                                                     "application/json", "utf-8"))
    drain(stack)
    record = json.loads(stack.client.redis.get(settings.status_key(task_id)))
    assert record["status"] == "failed" and reason in record["reason"], record
    assert ledger_ids(stack).get(task_id) in (None, "failed")
    assert stack.worker.alive()


def test_rollbacks_of_unknown_or_failed_edits_are_refused_through_the_queue(stack):
    blank = f"blank-{uuid.uuid4().hex[:8]}"  # recorded, then failed: its target is blank
    stack.client.redis.lpush(settings.queue_name(NAME), raw_envelope(
        settings.APPLY_TASK, blank, json_body({"prompt": "Who wrote Emma?", "target": " "}), "application/json", "utf-8"))
    drain(stack)
    assert ledger_ids(stack)[blank] == "failed"
    for edit, reason in ((blank, "only an applied edit can be rolled back"), (10**9, "no edit"),
                         ("no-such-request", "no edit")):
        record = stack.client.rollback(edit, name=NAME).wait(timeout=300)
        assert record["status"] == "failed" and reason in record["reason"], (edit, record)
    assert stack.worker.alive() and ledger_ids(stack)[blank] == "failed"


# ------------------------------------------------------------------------- data, not code


def test_template_strings_in_requests_are_data(stack):
    handle = stack.client.submit(TEMPLATES["prompt"], TEMPLATES["target"], rephrases=TEMPLATES["rephrases"],
                                 metadata=TEMPLATES["metadata"], name=NAME)
    record = handle.wait(timeout=300)
    assert record["status"] == "applied", record
    with Store.open(stack.root / "store", stack.root / "tensors") as store:
        edit = store.edit_by_request(handle.request_id)
    assert (edit.prompt, edit.target, edit.rephrases, edit.metadata) == (
        TEMPLATES["prompt"], TEMPLATES["target"], TEMPLATES["rephrases"], TEMPLATES["metadata"])
    assert not Path("/tmp/memoir-pwned").exists()
    assert "<class" not in stack.worker.log_text()  # nothing was formatted with the request's fields
    shown = run_cli("ledger", "show", str(edit.id), "--store", str(stack.root / "store"), "--json",
                    env={"MEMOIR_TENSORS": str(stack.root / "tensors")})
    assert shown.returncode == 0 and json.loads(shown.stdout.splitlines()[-1])["prompt"] == TEMPLATES["prompt"]


DANGEROUS_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}
DANGEROUS_ATTRIBUTES = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("marshal", "load"),
                        ("yaml", "load"), ("yaml", "unsafe_load"), ("os", "system"), ("os", "popen"),
                        ("shelve", "open"), ("dill", "loads"), ("jsonpickle", "decode")}


def dangerous_calls(path: Path) -> list[str]:
    """Calls that run, unpickle or format code/data they are given, in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func, where = node.func, f"{path.relative_to(REPO)}:{node.lineno}"
        if isinstance(func, ast.Name) and func.id in DANGEROUS_CALLS:
            found.append(f"{where}: {func.id}()")
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in DANGEROUS_ATTRIBUTES:
                found.append(f"{where}: {owner}.{func.attr}()")
            elif func.attr in ("format", "format_map") and not isinstance(func.value, ast.Constant):
                found.append(f"{where}: .{func.attr}() on a string that is not a literal")
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in node.keywords):
            found.append(f"{where}: shell=...")
    return found


def test_no_code_runs_or_unpickles_request_data():
    sources = [p for package in ("pipeline", "workers", "store", "memoir") for p in sorted((REPO / package).rglob("*.py"))]
    assert len(sources) > 20
    assert [hit for path in sources for hit in dangerous_calls(path)] == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan can fail: a file with each pattern is caught."""
    bad = REPO / "tests" / "reliability" / f".scan-probe-{uuid.uuid4().hex}.py"
    bad.write_text("import os, pickle\neval(x)\npickle.loads(b)\nos.system(c)\nt.format(**r)\n"
                   "subprocess.run(c, shell=True)\n'{}'.format(1)\n")
    try:
        assert len(dangerous_calls(bad)) == 5
    finally:
        bad.unlink()


# ------------------------------------------------------------------------------- secrets


def test_the_password_never_appears_in_output_files_or_redis(stack):
    drain(stack)
    assert PASSWORD not in stack.worker.log_text()
    assert "***" in stack.worker.ready_line and PASSWORD not in stack.worker.ready_line
    for directory in (stack.root / "store", stack.root / "tensors"):
        for path in directory.rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), f"the password is in {path}"
    r = stack.client.redis
    for key in r.scan_iter("*"):
        kind = r.type(key)
        values = {"string": lambda: [r.get(key)], "list": lambda: r.lrange(key, 0, -1),
                  "hash": lambda: list(r.hgetall(key).values()), "zset": lambda: r.zrange(key, 0, -1),
                  "set": lambda: list(r.smembers(key))}.get(kind, lambda: [])()
        assert not any(PASSWORD in str(v) for v in values), f"the password is in Redis key {key}"
    wrong = stack.server.url.replace(PASSWORD, PASSWORD[::-1])
    done = run_cli("submit", "--prompt", "q?", "--target", "a", "--name", NAME,
                   env={**stack.server.env, "MEMOIR_REDIS_URL": wrong})
    assert done.returncode != 0 and "error:" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout and PASSWORD[::-1] not in done.stderr + done.stdout


def test_tls_is_verified(stack):
    if stack.tls is None:
        pytest.skip("this redis-server has no TLS support (or openssl is missing): rediss:// not served here")
    assert stack.server.url.startswith("rediss://")
    env_ca = os.environ.pop("MEMOIR_REDIS_CA", None)
    try:
        with pytest.raises(BrokerError) as info:  # the default trust store does not know the test CA
            Client(stack.server.url).submit("q?", "a", name=NAME)
    finally:
        if env_ca is not None:
            os.environ["MEMOIR_REDIS_CA"] = env_ca
    assert PASSWORD not in str(info.value)


# --------------------------------------------------------------------------- permissions


def test_a_store_made_by_the_worker_is_owner_only(stack):
    drain(stack)
    paths = [p for d in (stack.root / "store", stack.root / "tensors") for p in (d, *d.rglob("*"))]
    names = {p.name for p in paths}
    assert {"ledger.db", "ledger.db-wal", "ledger.db-shm", f"{NAME}.lock", "deltas"} <= names, names
    loose = [f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in paths
             if p.exists() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []
