"""The HTTP edit API (`POST /v1/edits`, `GET /v1/edits/{id}`, `POST /v1/edits/{id}/rollback`,
`GET /v1/ledger`) and API keys, on a real stack: Redis (DB 4, flushed), a real `memoir worker` and
real `memoir serve` processes on the built-in model. Every request to a server is made with httpx
only, as a service in another language would (the project is imported only to build the stack).

Servers: `keyed` (a read-write key on the command line, a read-only one in MEMOIR_API_KEYS, debug
JSON logs, so that a key written to a log would be found), `open` (no key), `dead` (its Redis URL
leads to a socket that accepts connections and never answers: the worst Redis outage, a hang).
The tests run in file order and share the ledger; each says what it adds to it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from memoir import MemoirConfig
from serving.edits import is_write
from serving.keys import KeyConfigError, Keys, exposure_warning, is_loopback, parse_key

from test_serving_http import REPO, Server, wait_until, worker_stack

REDIS_URL = "redis://127.0.0.1:6379/4"
NAME = "api"
CONFIG = MemoirConfig(check_size=1, threshold=0.9)  # as test_serving_http: the tiny model's prompts stay apart
RW_KEY = "rw-" + secrets.token_hex(16)
RO_KEY = "ro-" + secrets.token_hex(16)
WRONG_KEY = "no-" + secrets.token_hex(16)
RW = {"Authorization": f"Bearer {RW_KEY}"}
RO = {"Authorization": f"Bearer {RO_KEY}"}
TERMINAL = ("applied", "failed", "rolled_back", "done")


# -- keys, without a server ---------------------------------------------------------------------
def test_key_specs_parse_into_modes_and_refuse_without_echoing_the_key():
    keys = Keys.from_options(["alpha", "beta:ro", "gamma:RW"], env=" delta:ro , ,epsilon ")
    assert [(k.source, k.write) for k in keys.keys] == [
        ("--api-key #1", True), ("--api-key #2", False), ("--api-key #3", True),
        ("MEMOIR_API_KEYS #1", False), ("MEMOIR_API_KEYS #3", True)]
    assert keys.check("beta").write is False and keys.check("alpha").write is True
    assert keys.check("delta").source == "MEMOIR_API_KEYS #1" and keys.check("epsilon").write
    assert keys.check("alph") is None and keys.check("alpha ") is None and keys.check("") is None
    assert "alpha" not in repr(keys) and "alpha" not in repr(keys.keys)
    for spec in ("secret-one:xx", "secret-one:", "secret one", ":ro", "", "sécret"):
        with pytest.raises(KeyConfigError) as refused:
            parse_key(spec, "--api-key #1")
        assert "secret" not in str(refused.value).replace("--api-key", "") and "--api-key #1" in str(refused.value)
    with pytest.raises(KeyConfigError, match="another mode"):
        Keys.from_options(["same:ro"], env="same:rw")
    assert not Keys.from_options([], env="") and not Keys.from_options([], env=" , ")


def test_which_routes_write_and_which_hosts_warn():
    assert is_write("POST", "/v1/edits") and is_write("POST", "/v1/edits/abc/rollback")
    assert not is_write("GET", "/v1/edits/abc") and not is_write("POST", "/v1/completions")
    assert not is_write("GET", "/v1/ledger") and not is_write("POST", "/v1/chat/completions")
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host) and exposure_warning(host, Keys()) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        assert not is_loopback(host) and "no API key" in exposure_warning(host, Keys()), host
        assert exposure_warning(host, Keys.from_options(["k:ro"], env="")) is None


def _serve_briefly(*options: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`memoir serve` on a store that does not exist: it prints what it prints at start, then stops."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--model", "builtin", "--port", "0",
                           "--store", str(REPO / "no-such-store-for-test_edit_api"), *options],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=300)


def test_serve_warns_on_an_exposed_host_without_keys_and_refuses_bad_keys(trained_llama_path):
    env = {k: v for k, v in os.environ.items() if k != "MEMOIR_API_KEYS"} | {"PYTHONPATH": str(REPO)}
    exposed = _serve_briefly("--host", "0.0.0.0", env=env)
    assert "warning: memoir serve binds 0.0.0.0 with no API key" in exposed.stderr, exposed.stderr
    assert exposed.returncode != 0 and "no store at" in exposed.stderr  # and then it stopped, as it should
    keyed = _serve_briefly("--host", "0.0.0.0", env={**env, "MEMOIR_API_KEYS": "k-" + secrets.token_hex(8)})
    local = _serve_briefly(env=env)
    assert "no API key" not in keyed.stderr + local.stderr and "no store at" in keyed.stderr + local.stderr
    secret = "topsecret" + secrets.token_hex(8)
    bad = _serve_briefly("--api-key", f"{secret}:admin", env=env)
    assert bad.returncode == 2 and "--api-key #1: the part after the last ':' must be ro or rw" in bad.stderr
    assert secret not in bad.stderr + bad.stdout and "listening" not in bad.stdout


# -- the stack --------------------------------------------------------------------------------------
class Silent:
    """A TCP port that accepts connections and never sends a byte back."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_llama_path, zsre):
    root = tmp_path_factory.mktemp("edit_api")
    silent = Silent()
    with worker_stack(root, REDIS_URL, NAME, CONFIG, zsre[0], "api-a") as base:
        env = {k: v for k, v in base.env.items() if k != "MEMOIR_API_KEYS"}
        serve = ["serve", "--model", "builtin", "--name", NAME, "--store", base.store, "--port", "0", "--poll", "0.5"]
        servers = {
            "keyed": Server(serve + ["--api-key", RW_KEY, "--loglevel", "DEBUG", "--log-format", "json"],
                            {**env, "MEMOIR_API_KEYS": f"{RO_KEY}:ro"}, root / "keyed.log"),
            "open": Server(serve, env, root / "open.log"),
            "dead": Server(serve, {**env, "MEMOIR_REDIS_URL": f"redis://127.0.0.1:{silent.port}/0"},
                           root / "dead.log"),
        }
        base.processes += servers.values()
        for server in servers.values():
            server.start()
        clients = {name: httpx.Client(base_url=server.url, timeout=60) for name, server in servers.items()}
        try:
            yield SimpleNamespace(client=base.client, store=base.store, env=env, servers=servers, **clients)
        finally:
            for client in clients.values():
                client.close()
    silent.close()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-format error of a response that must have `status`."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def until_terminal(http: httpx.Client, request_id: str, headers: dict[str, str] | None = None,
                   timeout: float = 300) -> dict[str, Any]:
    """Poll GET /v1/edits/{id} until the request ends (applied, failed, rolled back, done)."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/edits/{request_id}", headers=headers)
        assert response.status_code == 200, response.text
        record = response.json()
        if record["status"] in TERMINAL or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def ledger(http: httpx.Client, headers: dict[str, str] | None = None, **query: Any) -> list[dict[str, Any]]:
    """Every edit of the memory, read page by page (`limit` per page)."""
    rows, after = [], 0
    while True:
        response = http.get("/v1/ledger", params={**query, "after_seq": after}, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        rows += page["data"]
        if not page["has_more"]:
            assert page["next_after_seq"] is None
            return rows
        after = page["next_after_seq"]
        assert after == page["data"][-1]["seq"]


def completion(http: httpx.Client, prompt: str, headers: dict[str, str] | None = None, **options: Any) -> str:
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, **options}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# -- what the stack answers -----------------------------------------------------------------------
def test_openapi_lists_the_routes_and_the_edit_request_schema(stack):
    import jsonschema

    document = stack.keyed.get("/openapi.json")  # open: a schema, no data
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert {"/v1/edits", "/v1/edits/{id}", "/v1/edits/{id}/rollback", "/v1/ledger", "/v1/completions",
            "/v1/schemas/edit-request"} <= set(paths)
    submit = paths["/v1/edits"]["post"]
    body_schema = submit["requestBody"]["content"]["application/json"]["schema"]
    assert {"202", "200", "400", "401", "403", "409", "503"} <= set(submit["responses"])
    assert "422" not in submit["responses"]  # FastAPI's validation answers are 400s here
    assert "Idempotency-Key" in [p["name"] for p in submit["parameters"]]
    assert paths["/v1/ledger"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/LedgerPage")
    assert document.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    error_of(stack.keyed.get("/v1/schemas/edit-request"), 401)  # under /v1/: a key
    schema = stack.keyed.get("/v1/schemas/edit-request", headers=RO).json()
    assert schema["$schema"].endswith("2020-12/schema") and schema["properties"]["name"]["default"] == NAME
    def plain(properties: dict[str, Any]) -> dict[str, Any]:  # OpenAPI leaves out `"default": null`
        return {k: {a: b for a, b in v.items() if not (a == "default" and b is None)} for k, v in properties.items()}

    assert {k: v for k, v in schema.items() if k not in ("$schema", "properties")} == {
        k: v for k, v in body_schema.items() if k != "properties"}
    assert plain(schema["properties"]) == plain({**body_schema["properties"],
                                                 "name": {**body_schema["properties"]["name"], "default": NAME}})
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    assert validator.is_valid({"prompt": "Who?", "target": "Me", "rephrases": ["Who, then?"], "metadata": {"a": 1}})
    for bad in ({"prompt": "Who?"}, {"prompt": "Who?", "target": ""}, {"prompt": 5, "target": "x"},
                {"prompt": "Who?", "target": "x", "colour": "red"}, {"prompt": "x" * 2001, "target": "y"},
                {"prompt": "Who?", "target": "x", "request_id": "has space"}):
        assert not validator.is_valid(bad), bad


def test_keys_guard_every_v1_route_and_writes_need_a_read_write_key(stack, zsre):
    http = stack.keyed
    before = ledger(http, RO)
    record = {"prompt": zsre[5]["src"], "target": zsre[5]["alt"]}
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/memory", None),
                               ("POST", "/v1/completions", {"prompt": "hi"}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("GET", "/v1/ledger", None), ("GET", "/v1/edits/api-a", None),
                               ("POST", "/v1/edits", record), ("POST", "/v1/edits/api-a/rollback", {})):
        for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": RW_KEY},
                        {"Authorization": f"Basic {RW_KEY}"}):
            response = http.request(method, path, json=body, headers={**headers, "Idempotency-Key": "keyless"})
            assert error_of(response, 401)["code"] == "invalid_api_key", (method, path, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
        if method == "POST" and path.startswith("/v1/edits"):
            refused = http.request(method, path, json=body, headers={**RO, "Idempotency-Key": "read-only"})
            assert error_of(refused, 403)["code"] == "insufficient_permissions"
        else:
            assert http.request(method, path, json=body, headers=RO).status_code == 200, (method, path)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert http.get(path).status_code == 200, path
    assert http.post("/v1/completions", json={"prompt": "hi"}, headers={"authorization": f"bearer {RW_KEY}"}).is_success
    # nothing refused reached the queue or the ledger
    for request_id in ("keyless", "read-only"):
        error_of(http.get(f"/v1/edits/{request_id}", headers=RO), 404)
    assert stack.client.queue_length(NAME) == 0 and ledger(http, RO) == before
    assert stack.open.get("/v1/ledger").status_code == 200  # no keys: open, as before keys existed


def test_submit_wait_serve_roll_back_with_a_key(stack, zsre):
    """The done criterion, with httpx alone: submit with a key, wait, the answer changes, roll back."""
    http, b = stack.keyed, zsre[1]
    base = completion(http, b["src"], RO, use_memory=False)
    assert not base.strip().startswith(b["alt"])
    body = {"prompt": b["src"], "target": b["alt"], "rephrases": [b["rephrase"]], "metadata": {"source": "http"}}
    response = http.post("/v1/edits", json=body, headers={**RW, "Idempotency-Key": "api-b"})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert (queued["id"], queued["object"], queued["request_id"], queued["name"]) == ("api-b", "edit", "api-b", NAME)
    assert queued["duplicate"] is False and queued["status"] in ("submitted", "queued", "applying", "applied")
    assert response.headers["Location"] == "/v1/edits/api-b"
    done = until_terminal(http, "api-b", RO)
    assert done["status"] == "applied" and done["seq"] == 2 and isinstance(done["edit_id"], int), done
    assert set(done["scores"]) >= {"rel", "gen", "loc"}
    assert done["ledger"]["request_id"] == "api-b" and done["ledger"]["metadata"] == {"source": "http"}
    assert done["ledger"]["status"] == "applied" and "mask" not in done["ledger"]
    wait_until(lambda: completion(http, b["src"], RO).strip().startswith(b["alt"]), 10, "the edit is served")

    response = http.post("/v1/edits/api-b/rollback", json={"reason": "over http"},
                         headers={**RW, "Idempotency-Key": "api-b-undo"})
    assert response.status_code == 202, response.text
    undo = response.json()
    assert (undo["id"], undo["object"], undo["edit"], undo["duplicate"]) == ("api-b-undo", "rollback", "api-b", False)
    assert until_terminal(http, "api-b-undo", RO)["status"] == "done"
    rolled = until_terminal(http, "api-b", RO)
    assert rolled["status"] == "rolled_back" and rolled["ledger"]["status"] == "rolled_back", rolled
    wait_until(lambda: completion(http, b["src"], RO) == base, 10, "the rollback is served")
    events = [e["kind"] for e in json.loads(subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ledger", "show", str(done["edit_id"]), "--store", stack.store,
         "--json"], cwd=REPO, env=stack.env, text=True, capture_output=True, check=True).stdout)["events"]]
    assert "rolled_back" in events and events[-1] == "rollback_done"


def test_idempotency_key_repeats_give_the_same_edit_and_conflicts_queue_nothing(stack, zsre):
    http, b = stack.keyed, zsre[1]
    body = {"prompt": b["src"], "target": b["alt"], "rephrases": [b["rephrase"]], "metadata": {"source": "http"}}
    again = http.post("/v1/edits", json=body, headers={**RW, "Idempotency-Key": "api-b"})
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["id"] == "api-b"
    assert again.json()["status"] == "rolled_back"  # the same edit as it stands, not a second one
    same_in_body = http.post("/v1/edits", json={**body, "request_id": "api-b"}, headers=RW)
    assert same_in_body.status_code == 200 and same_in_body.json()["duplicate"] is True
    conflict = http.post("/v1/edits", json={**body, "target": "someone else"},
                         headers={**RW, "Idempotency-Key": "api-b"})
    assert error_of(conflict, 409)["code"] == "idempotency_conflict" and "api-b" in error_of(conflict, 409)["message"]
    mismatch = http.post("/v1/edits", json={**body, "request_id": "api-c"}, headers={**RW, "Idempotency-Key": "api-b"})
    assert error_of(mismatch, 400)["param"] == "request_id"
    undo_again = http.post("/v1/edits/api-b/rollback", json={"reason": "over http"},
                           headers={**RW, "Idempotency-Key": "api-b-undo"})
    assert undo_again.status_code == 200 and undo_again.json()["duplicate"] is True
    assert undo_again.json()["status"] == "done"
    other = http.post("/v1/edits/api-b-undo/rollback", json={}, headers={**RW, "Idempotency-Key": "undo-b-again"})
    assert "not an edit" in error_of(other, 400)["message"]
    ended = http.post("/v1/edits/api-b/rollback", headers={**RW, "Idempotency-Key": "undo-b-twice"})
    assert error_of(ended, 409)["code"] == "not_live"
    undo_conflict = http.post("/v1/edits/api-b/rollback", json={"reason": "another reason"},
                              headers={**RW, "Idempotency-Key": "api-b-undo"})
    assert error_of(undo_conflict, 409)["code"] == "idempotency_conflict"
    rows = ledger(http, RO)
    assert [r["request_id"] for r in rows].count("api-b") == 1
    for refused in ("undo-b-again", "undo-b-twice"):
        error_of(http.get(f"/v1/edits/{refused}", headers=RO), 404)
    # a submit without a key gets a fresh id each time: two requests, two edits
    first = http.post("/v1/edits", json={"prompt": zsre[6]["src"], "target": zsre[6]["alt"]}, headers=RW).json()
    second = http.post("/v1/edits", json={"prompt": zsre[6]["src"], "target": zsre[6]["alt"]}, headers=RW).json()
    assert first["id"] != second["id"] and not first["duplicate"] and not second["duplicate"]
    for request_id in (first["id"], second["id"]):
        assert until_terminal(http, request_id, RO)["status"] in ("applied", "failed")


def test_bad_input_is_refused_clearly_and_queues_nothing(stack, zsre):
    http, headers = stack.keyed, {**RW, "Content-Type": "application/json"}
    before = ledger(http, RO)
    good = {"prompt": zsre[7]["src"], "target": zsre[7]["alt"]}
    cases = [
        (b'{"prompt": "Who?", "target": ', "body", "not JSON"),
        (b'{"prompt": "Who\xff?", "target": "x"}', "body", "not valid UTF-8"),
        (b"", "body", "empty"),
        (b"[1, 2]", "request", "JSON object"),
        (json.dumps({"prompt": 5, "target": "x"}).encode(), "prompt", "must be text"),
        (json.dumps({"prompt": "   ", "target": "x"}).encode(), "prompt", "empty"),
        (json.dumps({"target": "x"}).encode(), "prompt", "must be text"),
        (json.dumps({"prompt": "x" * 2001, "target": "y"}).encode(), "prompt", "limit is 2000"),
        (json.dumps({"prompt": "Who?", "target": "x", "rephrases": "Who, then?"}).encode(), "rephrases", "list"),
        (json.dumps({"prompt": "Who?", "target": "x\u0007"}).encode(), "target", "control character"),
        (b'{"prompt": "Who\\ud800?", "target": "x"}', "prompt", "UTF-8"),
        (json.dumps({"prompt": "Who?", "target": "x", "colour": "red"}).encode(), "colour", "not a request field"),
        (json.dumps({"prompt": "Who?", "target": "x", "metadata": [1]}).encode(), "metadata", "JSON object"),
        (json.dumps({"prompt": "Who?", "target": "x", "name": "another"}).encode(), "name", "edits memory 'api'"),
        (json.dumps({"prompt": "Who?", "target": "x", "replaces": True}).encode(), "replaces", "must be"),
    ]
    for n, (raw, param, words) in enumerate(cases):
        response = http.post("/v1/edits", content=raw, headers={**headers, "Idempotency-Key": f"bad-{n}"})
        problem = error_of(response, 400)
        assert problem["param"] == param and words in problem["message"], (raw[:60], problem)
        assert problem["type"] == "invalid_request_error"
    for key in ("has space", "x" * 129, "semi;colon"):
        problem = error_of(http.post("/v1/edits", json=good, headers={**RW, "Idempotency-Key": key}), 400)
        assert problem["param"] == "Idempotency-Key"
    assert error_of(http.get("/v1/edits/no-such-edit", headers=RO), 404)["code"] == "not_found"
    assert error_of(http.post("/v1/edits/no-such-edit/rollback", headers=RW), 404)["code"] == "not_found"
    assert error_of(http.get("/v1/edits/bad%20id", headers=RO), 400)["param"] == "id"
    assert error_of(http.post("/v1/edits/api-a/rollback", json={"exact": "yes"}, headers=RW), 400)["param"] == "exact"
    assert error_of(http.post("/v1/edits/api-a/rollback", json={"why": "x"}, headers=RW), 400)["param"] == "why"
    assert error_of(http.post("/v1/edits/api-a/rollback", content=b"{", headers=headers), 400)["param"] == "body"
    for query, param in (({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "ten"}, "limit"),
                         ({"after_seq": -1}, "after_seq"), ({"status": "lost"}, "status")):
        assert error_of(http.get("/v1/ledger", params=query, headers=RO), 400)["param"] == param, query
    # Nothing was queued: an edit sent now is the only one the worker records (the queue is ordered).
    response = http.post("/v1/edits", json=good, headers={**RW, "Idempotency-Key": "api-good"})
    assert response.status_code == 202 and until_terminal(http, "api-good", RO)["status"] in ("applied", "failed")
    after = ledger(http, RO)
    assert [r["request_id"] for r in after] == [r["request_id"] for r in before] + ["api-good"]
    for n in range(len(cases)):
        error_of(http.get(f"/v1/edits/bad-{n}", headers=RO), 404)


def test_the_ledger_pages_match_memoir_ledger_list(stack):
    http = stack.keyed
    listed = json.loads(subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ledger", "list", "--name", NAME, "--store", stack.store, "--json"],
        cwd=REPO, env=stack.env, text=True, capture_output=True, check=True).stdout.strip().splitlines()[-1])
    assert len(listed) >= 5
    for limit in (1, 2, 500):
        assert ledger(http, RO, limit=limit) == listed, limit
    first = http.get("/v1/ledger", params={"limit": 2}, headers=RO).json()
    assert [r["seq"] for r in first["data"]] == [1, 2] and first["has_more"] and first["next_after_seq"] == 2
    assert first["object"] == "list" and first["name"] == NAME
    applied = ledger(http, RO, limit=2, status="applied")
    assert applied == [r for r in listed if r["status"] == "applied"] and applied
    rolled = http.get("/v1/ledger", params={"status": "rolled_back"}, headers=RO).json()["data"]
    assert [r["request_id"] for r in rolled] == ["api-b"]
    end = http.get("/v1/ledger", params={"after_seq": listed[-1]["seq"]}, headers=RO).json()
    assert end["data"] == [] and end["has_more"] is False and end["next_after_seq"] is None


def test_a_redis_that_does_not_answer_is_a_503_not_a_hang(stack):
    http = stack.dead
    for method, path, body in (("POST", "/v1/edits", {"prompt": "Who?", "target": "Me"}),
                               ("GET", "/v1/edits/api-a", None), ("POST", "/v1/edits/api-a/rollback", {})):
        started = time.monotonic()
        response = http.request(method, path, json=body, headers={"Idempotency-Key": "never-sent"})
        problem = error_of(response, 503)
        assert problem["code"] in ("broker_unavailable", "unavailable") and problem["type"] == "server_error"
        assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 20, (path, time.monotonic() - started)  # the API's bound is 10 s
    assert [r["request_id"] for r in http.get("/v1/ledger").json()["data"]][:1] == ["api-a"]  # no Redis needed
    assert http.get("/healthz").status_code == 200


def test_a_curl_script_submits_waits_and_rolls_back(stack, zsre):
    """scripts/edit_over_http.sh: the README's non-Python producer, against the keyed server."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    record = zsre[1]
    result = subprocess.run(["bash", str(REPO / "scripts" / "edit_over_http.sh")], cwd=REPO, text=True,
                            capture_output=True, timeout=600,
                            env={"PATH": os.environ["PATH"], "MEMOIR_URL": stack.servers["keyed"].url,
                                 "MEMOIR_API_KEY": RW_KEY, "EDIT_ID": "curl-b", "PROMPT": record["src"],
                                 "TARGET": record["alt"], "TIMEOUT": "120"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {k: v.strip() for k, v in (line.split(":", 1) for line in result.stdout.splitlines())}
    assert lines["after edit"].startswith(record["alt"]), result.stdout
    assert lines["after undo"] == lines["before"] and not lines["before"].startswith(record["alt"]), result.stdout
    assert "edit:        rolled_back" in result.stdout and "rollback:    done" in result.stdout
    assert until_terminal(stack.keyed, "curl-b", RO)["status"] == "rolled_back"
    bad = subprocess.run(["bash", str(REPO / "scripts" / "edit_over_http.sh")], cwd=REPO, text=True,
                         capture_output=True, timeout=120,
                         env={"PATH": os.environ["PATH"], "MEMOIR_URL": stack.servers["keyed"].url,
                              "MEMOIR_API_KEY": RO_KEY, "EDIT_ID": "curl-ro"})
    assert bad.returncode != 0 and "HTTP 403" in bad.stderr and "submitted" not in bad.stdout


def test_no_key_appears_in_the_server_logs(stack):
    """Last: every key above was sent, right and wrong, to a server logging at DEBUG."""
    server = stack.servers["keyed"]
    server.stop()  # flushes its log
    lines = []
    while not server.lines.empty():
        lines.append(server.lines.get())
    logged = server.log.read_text() + "\n".join(lines)
    assert "edit API: submitted edit api-b" in logged  # the log does hold the requests
    for key in (RW_KEY, RO_KEY, WRONG_KEY):
        assert key not in logged and key[3:] not in logged
