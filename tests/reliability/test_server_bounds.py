"""The server is bounded: `memoir serve` as a real process on loopback, fed what an attacker or a
traffic spike sends (a 4 MB prompt, a flood of concurrent requests, a body that never finishes, a
generation longer than the request timeout) while another client checks that `/healthz` still
answers at once. Bounded in count and time; nothing leaves 127.0.0.1.

The latency bound (0.5 s) is generous on purpose: it is a correctness property (the event loop is
never blocked by one request's work), not a benchmark; unbounded, a 4 MB prompt blocked it for 4 s.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_observability import scrape, value  # noqa: I001 - tests/ is on sys.path (rootdir conftest)
from test_serving_http import Server, wait_until

from memoir import MemoirConfig
from pipeline.local_redis import free_port
from workers.runtime import Runtime

from .harness import REPO

NAME = "bounded"
HEALTHZ_BOUND = 2.0  # seconds: a shared 2-core machine stalls now and then; the defect blocked it 4-5 s
MIN_PROBES = 5
FLOOD_TOKENS = 200  # of the tiny model's 256-token context

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("bounds") / "store")
    Runtime.open("builtin", path, name=NAME, config=MemoirConfig(check_size=1, threshold=0.9)).close()
    return path


def serve(store: str, log: Path, *options: str) -> Server:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEMOIR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    args = ["serve", "--model", "builtin", "--name", NAME, "--store", store, "--port", "0", "--poll", "30", *options]
    return Server(args, env, log).start()


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, Any, Any]:
    """(status, headers (case-insensitive), JSON answer)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


class HealthWatch:
    """GETs /healthz every 50 ms on its own thread; `latencies` are the seconds each took."""

    def __init__(self, server: Server) -> None:
        self.url = server.url + "/healthz"
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    assert response.status == 200
                    response.read()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(repr(exc))
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(0.05)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 30
        while len(self.latencies) < MIN_PROBES and time.monotonic() < deadline:  # a fast request: probe on
            time.sleep(0.05)
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        assert len(self.latencies) >= MIN_PROBES
        assert max(self.latencies) < HEALTHZ_BOUND, sorted(self.latencies)[-5:]


def test_a_huge_prompt_is_refused_without_stalling_the_server(store, tmp_path):
    """Defect 6: a 4 MB prompt was tokenised on the event loop and blocked /healthz for 4 s."""
    server = serve(store, tmp_path / "serve.log")  # the defaults: 1 MB body limit
    try:
        huge = json.dumps({"prompt": "What university did Watts Humphrey attend? " * 95_000, "max_tokens": 4})
        assert len(huge) > 4_000_000
        answers: list[Any] = []
        with HealthWatch(server) as watch:
            time.sleep(0.2)
            for _ in range(2):
                sender = threading.Thread(target=lambda: answers.append(post(server.url + "/v1/completions",
                                                                             huge.encode())))
                sender.start()
                sender.join()
            time.sleep(0.3)
        watch.check()
        print(f"4 MB prompts: {[a[0] for a in answers]}; /healthz max {max(watch.latencies):.3f} s meanwhile")
        for status, _, answer in answers:
            assert status == 413, answer
            assert answer["error"]["type"] == "invalid_request_error" and "1048576" in answer["error"]["message"]
        # just under the limit: parsed and tokenised off the event loop, refused for the model's context
        big = json.dumps({"prompt": "What university did Watts Humphrey attend? " * 23_000, "max_tokens": 4})
        assert 900_000 < len(big) < 1_048_576
        with HealthWatch(server) as watch:
            status, _, answer = post(server.url + "/v1/completions", big.encode())
        watch.check()
        assert status == 400 and answer["error"]["param"] == "max_tokens", answer
        assert server.get("/healthz")["status"] == "ok"
        print(f"1 MB prompt refused for the context; /healthz max {max(watch.latencies):.3f} s meanwhile")
    finally:
        server.stop()


def test_a_flood_gets_503_with_retry_after_while_healthz_stays_fast(store, tmp_path):
    # one sequence per batch and long answers: requests overlap on any CPU, so the inbox of 4 fills
    server = serve(store, tmp_path / "serve.log", "--max-queue", "4", "--max-batch", "1")
    body = json.dumps({"prompt": "What university did Watts Humphrey attend?", "max_tokens": FLOOD_TOKENS,
                       "ignore_eos": True}).encode()
    results: list[tuple[int, Any, Any]] = []
    try:
        with HealthWatch(server) as watch:
            def client() -> None:
                for _ in range(3):
                    results.append(post(server.url + "/v1/completions", body))

            clients = [threading.Thread(target=client) for _ in range(8)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
        watch.check()
        counts = Counter(status for status, _, _ in results)
        assert set(counts) <= {200, 503} and counts[200] >= 4 and counts[503] >= 1, counts
        for status, headers, answer in results:
            if status == 503:
                assert int(headers["Retry-After"]) >= 1 and answer["error"]["code"] == "overloaded", answer
            else:
                assert answer["usage"]["completion_tokens"] == FLOOD_TOKENS
        assert server.complete("What university did Watts Humphrey attend?")["choices"][0]["finish_reason"]
        print(f"flood: {dict(counts)}; /healthz {len(watch.latencies)} probes, max {max(watch.latencies):.3f} s")
    finally:
        server.stop()


MANY_PROMPTS = 64  # the most one request may carry


def test_slow_bodies_get_408_and_long_generations_504(store, tmp_path):
    server = serve(store, tmp_path / "serve.log", "--request-timeout", "0.5")
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # ... and the rest never comes
            started = time.monotonic()
            reply = sock.recv(65536).decode()
            waited = time.monotonic() - started
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                reply += chunk.decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert 0.4 < waited < 10 and '"type":"invalid_request_error"' in reply.replace(" ", "")
        tokens = value(scrape(server.url + "/metrics"), "memoir_generated_tokens_total")
        started = time.monotonic()
        # far more work than 0.5 s on any CPU: many prompts, each to the end of the tiny model's context
        long = {"prompt": [f"What university did Watts Humphrey attend? ({i})" for i in range(MANY_PROMPTS)],
                "max_tokens": 220, "ignore_eos": True}
        status, _, answer = post(server.url + "/v1/completions", json.dumps(long).encode())
        assert status == 504 and answer["error"]["type"] == "timeout_error", answer
        assert time.monotonic() - started < 10
        # the engine stopped that generation: its batch ends (and is counted) well short of the
        # 64 × 220 tokens asked for, however fast or loaded the machine
        wait_until(lambda: value(scrape(server.url + "/metrics"), "memoir_generated_tokens_total") > tokens, 20,
                   "the stopped batch counted")
        generated = value(scrape(server.url + "/metrics"), "memoir_generated_tokens_total") - tokens
        assert 0 < generated < MANY_PROMPTS * 220, generated
        # and the server answers again (retried: on a loaded machine a short completion can itself
        # take longer than the 0.5 s this server allows)
        short = json.dumps({"prompt": "What university did Watts Humphrey attend?", "max_tokens": 4}).encode()
        wait_until(lambda: post(server.url + "/v1/completions", short)[0] == 200, 20, "a short completion")
    finally:
        server.stop()
