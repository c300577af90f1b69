"""`memoir serve` as real processes, beside a real `memoir worker`, queried with a real HTTP client.

One stack for the module: Redis (DB 15, flushed), a store whose memory is made on the trained
tiny Llama, a worker applying the queue, and three servers: one following the memory through
the worker's notices (its store poll is slowed to 30 s so that only a notice can explain a
reload within seconds), one with no Redis that can only poll the store, and one pinned at seq 1.
The tests run in file order: each edit or rollback they make through the queue is seen by the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from memoir import MemoirConfig
from pipeline.client import Client
from pipeline.local_redis import free_port, redis_for
from workers.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/15"
NAME = "served"
# At the paper's threshold 0.4 most prompts retrieve some edit of the tiny model (see test_serving).
CONFIG = MemoirConfig(check_size=1, threshold=0.9)
RELOAD_SECONDS = 5.0  # "within seconds": from the worker's `applied` to the server's new answer

pytestmark = pytest.mark.slow


class Process:
    """A `memoir` command in a new process; stdout is read line by line until its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.stderr = open(log, "w")
        self.popen = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def ready(self, prefix: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        self.stop()
        raise AssertionError(f"{prefix!r} never came; stderr:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.stderr.close()


class Server(Process):
    def start(self) -> "Server":
        line = self.ready("memoir serve ready:")
        self.url = line.split()[3]
        return self

    def request(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> Any:
        status, body = self.request(path)
        assert status == 200, body
        return body

    def post(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = self.request(path, body)
        assert status == 200, answer
        return answer

    def complete(self, prompt: str, **options: Any) -> dict[str, Any]:
        return self.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, **options})

    def text(self, prompt: str, **options: Any) -> str:
        return self.complete(prompt, **options)["choices"][0]["text"]

    def stream(self, path: str, body: dict[str, Any]) -> list[Any]:
        """The server-sent events of a streamed request: parsed chunks, then the string "[DONE]"."""
        req = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=120) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for raw in response:
                line = raw.decode().strip()
                if line:
                    assert line.startswith("data: "), line
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
        return events


def wait_until(check, timeout: float, what: str) -> float:
    """Seconds until `check()` is true (polled every 0.1 s), or fail after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


@contextlib.contextmanager
def worker_stack(root: Path, redis_url: str, name: str, config: MemoirConfig, record: dict[str, Any],
                 request_id: str, worker_options: tuple[str, ...] = ()) -> Iterator[SimpleNamespace]:
    """A Redis (flushed), a store whose memory `name` is made once, a real worker that has applied
    `record` as the first edit. The caller appends its servers to `processes`; at the end every
    process is stopped, last started first, and Redis flushed."""
    store = str(root / "store")
    with redis_for(redis_url) as (url, _):
        client = Client(url)
        client.redis.flushdb()
        Runtime.open("builtin", store, name=name, config=config).close()  # the memory, made once
        env = {**os.environ, "MEMOIR_REDIS_URL": url, "PYTHONPATH": str(REPO)}
        worker = Process(["worker", "--model", "builtin", "--name", name, "--store", store, *worker_options], env,
                         root / "worker.log")
        processes: list[Process] = [worker]
        try:
            worker.ready("memoir worker ready:")
            first = client.submit(record["src"], record["alt"], name=name, request_id=request_id).wait(timeout=300)
            assert first["status"] == "applied", first
            yield SimpleNamespace(client=client, url=url, env=env, store=store, worker=worker, first=first,
                                  processes=processes)
        finally:
            for process in reversed(processes):
                process.stop()
            client.redis.flushdb()
            client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_llama_path, zsre):
    root = tmp_path_factory.mktemp("serving")
    with worker_stack(root, REDIS_URL, NAME, CONFIG, zsre[0], "edit-a") as base:
        serve = ["serve", "--model", "builtin", "--name", NAME, "--store", base.store, "--port", "0"]
        servers = {
            "follow": Server(serve + ["--poll", "30"], base.env, root / "follow.log"),
            "polling": Server(serve + ["--poll", "0.5"],
                              {**base.env, "MEMOIR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
                              root / "polling.log"),
            "pinned": Server(serve + ["--at-seq", "1"], base.env, root / "pinned.log"),
        }
        base.processes += servers.values()
        for server in servers.values():
            server.start()
        yield SimpleNamespace(client=base.client, worker=base.worker, edit_a=base.first["edit_id"], **servers)


def test_edited_prompts_answer_their_target_and_others_as_the_base_model(stack, zsre):
    a, other = zsre[0], zsre[300]
    answer = stack.follow.complete(a["src"])
    assert answer["choices"][0]["text"].strip().startswith(a["alt"])
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    assert answer["memoir"]["retrieved"] == [[stack.edit_a]] and answer["memoir"]["seq"] == 1
    assert answer["system_fingerprint"] == "memoir-served-seq1-v1"
    base = stack.follow.complete(other["src"], use_memory=False)["choices"][0]["text"]
    unrelated = stack.follow.complete(other["src"])
    assert unrelated["choices"][0]["text"] == base and unrelated["memoir"]["retrieved"] == [[]]
    assert stack.follow.text(a["src"], use_memory=False) != answer["choices"][0]["text"]
    assert unrelated["choices"][0]["finish_reason"] == "stop"  # EOS before 8 tokens ...
    forced = stack.follow.complete(other["src"], max_tokens=12, ignore_eos=True)  # ... unless told to go on
    assert forced["usage"]["completion_tokens"] == 12 and forced["choices"][0]["finish_reason"] == "length"
    # one request, two prompts, one batch: retrieval is decided per sequence
    both = stack.follow.complete([a["src"], other["src"]])
    assert [c["text"] for c in both["choices"]] == [answer["choices"][0]["text"], base]
    assert both["memoir"]["retrieved"] == [[stack.edit_a], []]
    chat = stack.follow.post("/v1/chat/completions", {"messages": [{"role": "user", "content": a["src"]}],
                                                      "max_tokens": 8})
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["message"]["content"].startswith(a["alt"])


def test_streaming_returns_the_same_text(stack, zsre):
    prompts = [zsre[0]["src"], zsre[300]["src"]]
    for options in ({"max_tokens": 12}, {"max_tokens": 12, "stop": [zsre[0]["alt"][-3:]]}):
        plain = stack.follow.complete(prompts, **options)
        events = stack.follow.stream("/v1/completions", {"prompt": prompts, **options})
        assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
        assert len({e["id"] for e in events[:-1]}) == 1
        for choice in plain["choices"]:
            mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == choice["index"]]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
            assert all(c["finish_reason"] is None for c in mine[:-1])
    body = {"messages": [{"role": "user", "content": zsre[0]["src"]}], "max_tokens": 10}
    plain = stack.follow.post("/v1/chat/completions", body)["choices"][0]
    events = stack.follow.stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    chunks = [e["choices"][0] for e in events[:-2]]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(c["delta"].get("content", "") for c in chunks) == plain["message"]["content"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"]


def test_a_new_edit_is_served_within_seconds_without_a_restart(stack, zsre):
    b = zsre[1]
    base = stack.follow.text(b["src"], use_memory=False)
    assert not base.strip().startswith(b["alt"])
    outcome = stack.client.submit(b["src"], b["alt"], name=NAME, request_id="edit-b").wait(timeout=300)
    assert outcome["status"] == "applied" and outcome["seq"] == 2
    for server in (stack.follow, stack.polling):  # by the worker's notice; by polling the store
        seconds = wait_until(lambda: server.text(b["src"]).strip().startswith(b["alt"]), RELOAD_SECONDS,
                             f"{server.log.stem} serves edit b")
        memory = server.get("/v1/memory")
        assert (memory["seq"], memory["version"]) == (2, 2) and memory["reloads"] == 1, seconds
        assert [e["target"] for e in memory["edits"]] == [zsre[0]["alt"], b["alt"]]
    assert stack.follow.get("/v1/memory")["notices"] >= 1 and stack.polling.get("/v1/memory")["notices"] == 0
    assert stack.follow.get("/healthz")["notices"] and not stack.polling.get("/healthz")["notices"]
    assert stack.follow.get("/healthz")["following"] and stack.polling.get("/healthz")["following"]  # the ledger
    assert stack.pinned.text(b["src"]) == base  # pinned at seq 1


def test_a_rollback_is_served_within_seconds(stack, zsre):
    a = zsre[0]
    base = stack.follow.text(a["src"], use_memory=False)
    assert stack.follow.text(a["src"]).strip().startswith(a["alt"])
    outcome = stack.client.rollback(stack.edit_a, reason="test", name=NAME).wait(timeout=300)
    assert outcome["status"] == "done", outcome
    wait_until(lambda: stack.follow.text(a["src"]) == base, RELOAD_SECONDS, "the rollback is served")
    memory = stack.follow.get("/v1/memory")
    assert memory["seq"] == 2 and memory["version"] >= 3 and stack.edit_a not in [e["id"] for e in memory["edits"]]
    assert stack.follow.complete(a["src"])["memoir"]["retrieved"] == [[]]
    assert stack.follow.text(zsre[1]["src"]).strip().startswith(zsre[1]["alt"])  # the other edit stays


def test_a_pinned_server_does_not_move(stack, zsre):
    memory = stack.pinned.get("/v1/memory")
    assert (memory["seq"], memory["version"], memory["pinned"], memory["at_seq"]) == (1, 1, True, 1)
    assert [e["id"] for e in memory["edits"]] == [stack.edit_a] and memory["reloads"] == 0
    assert stack.pinned.text(zsre[0]["src"]).strip().startswith(zsre[0]["alt"])  # rolled back elsewhere
    assert stack.pinned.get("/healthz") == {"status": "ok", "name": NAME, "seq": 1, "version": 1, "pinned": True,
                                            "following": False, "lag_s": None, "error": None, "notices": False}
    assert stack.pinned.get("/readyz") == {"status": "ready", "seq": 1, "version": 1}


def test_bad_requests_are_refused_with_openai_errors(stack):
    server = stack.pinned
    for body, param in (({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
                        ({"prompt": "   "}, "prompt"),
                        ({"max_tokens": 4}, "prompt"),
                        ({"prompt": "x", "n": 0}, "n"),
                        ({"prompt": ["x"] * 65}, "prompt"),
                        ({"prompt": []}, "prompt"),
                        ({"prompt": "word " * 400}, "max_tokens")):
        status, answer = server.request("/v1/completions", body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
    status, answer = server.request("/v1/chat/completions", {"messages": []})
    assert status == 400 and answer["error"]["param"] == "messages"
    status, answer = server.request("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert status == 400 and "role" in answer["error"]["param"]
    assert server.get("/healthz")["status"] == "ok"
    assert server.get("/v1/models")["data"][0]["id"] == NAME  # the memory, not the model path
