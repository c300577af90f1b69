"""Observability (issue 14, part 1): Prometheus metrics of `memoir serve` and `memoir worker`,
JSON log lines, Celery events.

One stack for the module: Redis DB 6 of the one on 6379 (flushed), a store with memory
`observed` on the built-in tiny Llama, a real worker (`--metrics-port`, `--events`,
`--log-format json`) and a real server following it (`--log-format json`). The tests run in
file order and compare scrapes taken before and after what they do.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memoir import MemoirConfig
from pipeline import settings
from pipeline.local_redis import free_port

from test_serving_http import Server, wait_until, worker_stack

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/6"
NAME = "observed"
CONFIG = MemoirConfig(check_size=1, threshold=0.9)  # as in test_serving_http: unrelated prompts stay off

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def json_lines(path: Path) -> list[dict]:
    """The log's lines, each parsed (fails on a line that is not one JSON object)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed)
    return parsed


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trained_llama_path, zsre):
    root = tmp_path_factory.mktemp("observability")
    port = free_port()
    options = ("--metrics-port", str(port), "--events", "--log-format", "json")
    with worker_stack(root, REDIS_URL, NAME, CONFIG, zsre[0], "obs-a", options) as base:
        server = Server(["serve", "--model", "builtin", "--name", NAME, "--store", base.store, "--port", "0",
                         "--poll", "0.5", "--log-format", "json"], base.env, root / "serve.log")
        base.processes.append(server)
        server.start()
        yield SimpleNamespace(client=base.client, url=base.url, worker=base.worker, server=server,
                              edit_a=base.first["edit_id"], worker_metrics=f"http://127.0.0.1:{port}/metrics")


def test_server_metrics_count_completions(stack, zsre):
    server = stack.server
    before = scrape(server.url + "/metrics")
    assert value(before, "memoir_memory_seq") == 1 and value(before, "memoir_memory_live_edits") == 1
    assert 0 <= value(before, "memoir_memory_lag_seconds") < 30
    answers = [server.complete(zsre[0]["src"]),  # retrieves edit a
               server.complete([zsre[0]["src"], zsre[300]["src"]]),  # one batch of two: one retrieves
               server.complete(zsre[300]["src"], use_memory=False)]
    chat = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": zsre[0]["src"]}],
                                                "max_tokens": 8})
    status, _ = server.request("/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert status == 400
    after = scrape(server.url + "/metrics")

    assert moved(before, after, "memoir_http_requests_total", route="/v1/completions", status="200") == 3
    assert moved(before, after, "memoir_http_requests_total", route="/v1/completions", status="400") == 1
    assert moved(before, after, "memoir_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(after, "memoir_http_requests_total", route="/metrics", status="200") >= 1
    assert moved(before, after, "memoir_http_request_duration_seconds_count", route="/v1/completions") == 4
    assert moved(before, after, "memoir_http_request_duration_seconds_sum", route="/v1/completions") > 0
    tokens = sum(a["usage"]["completion_tokens"] for a in [*answers, chat])
    prompt_tokens = sum(a["usage"]["prompt_tokens"] for a in [*answers, chat])
    assert tokens > 0 and moved(before, after, "memoir_generated_tokens_total") == tokens
    assert moved(before, after, "memoir_prompt_tokens_total") == prompt_tokens
    assert moved(before, after, "memoir_batch_size_count") == 4 and moved(before, after, "memoir_batch_size_sum") == 5
    assert moved(before, after, "memoir_batch_size_bucket", le="1.0") == 3  # the two-prompt batch is over 1
    assert moved(before, after, "memoir_prompts_total", use_memory="true") == 4
    assert moved(before, after, "memoir_prompts_total", use_memory="false") == 1
    retrieved = sum(1 for a in [*answers, chat] for r in a["memoir"]["retrieved"] if r)
    assert retrieved == 3 and moved(before, after, "memoir_prompts_retrieved_total") == retrieved


def test_worker_metrics_count_edits_refusals_and_rollbacks(stack, zsre):
    client = stack.client
    before = scrape(stack.worker_metrics)
    assert value(before, "memoir_worker_live_edits") == 1 and value(before, "memoir_worker_queue_depth") == 0
    handles = [client.submit(zsre[n]["src"], zsre[n]["alt"], name=NAME, request_id=f"obs-{n}") for n in (1, 2, 3)]
    depth = value(scrape(stack.worker_metrics), "memoir_worker_queue_depth")  # read from Redis now
    assert 1 <= depth <= 3, depth
    # a message the worker refuses: it is never recorded (its prompt is not text)
    client.app.send_task(settings.APPLY_TASK, kwargs={"request": {"prompt": 5, "target": "x"}}, task_id="obs-bad",
                         queue=settings.queue_name(NAME))
    outcomes = [h.wait(timeout=300) for h in handles]
    assert all(o["status"] == "applied" for o in outcomes), outcomes
    wait_until(lambda: client.redis.get(settings.status_key("obs-bad")), 120, "the refusal")
    refused = json.loads(client.redis.get(settings.status_key("obs-bad")))
    assert refused["status"] == "failed" and refused["edit_id"] is None, refused
    rollback = client.rollback(outcomes[0]["edit_id"], reason="test", name=NAME).wait(timeout=300)
    assert rollback["status"] == "done", rollback
    after = scrape(stack.worker_metrics)

    assert moved(before, after, "memoir_worker_edits_total", status="applied") == 3
    assert moved(before, after, "memoir_worker_edits_total", status="refused") == 1
    assert moved(before, after, "memoir_worker_edits_total", status="failed") == 0
    assert moved(before, after, "memoir_worker_edit_seconds_count") == 4
    assert moved(before, after, "memoir_worker_edit_seconds_sum") > 0
    assert moved(before, after, "memoir_worker_rollbacks_total", status="done") == 1
    assert value(after, "memoir_worker_live_edits") == 3 and value(after, "memoir_worker_queue_depth") == 0
    # the server follows: the seq it serves is the ledger's
    wait_until(lambda: value(scrape(stack.server.url + "/metrics"), "memoir_memory_seq") == 4, 10, "seq 4 served")
    served = scrape(stack.server.url + "/metrics")
    assert value(served, "memoir_memory_live_edits") == 3 and value(served, "memoir_memory_reloads") >= 1
    assert not math.isnan(value(served, "memoir_memory_version"))


def test_json_logs_carry_the_request_ids(stack, zsre):
    answer = stack.server.complete(zsre[1]["src"])
    wait_until(lambda: any(line.get("request_id") == answer["id"] for line in json_lines(stack.server.log)),
               10, "the server logs the request")
    worker_lines = json_lines(stack.worker.log)
    edit = stack.client.status("obs-2")
    mine = [line for line in worker_lines if line.get("request_id") == "obs-2"]
    assert any(line.get("edit_id") == edit["edit_id"] and "applied" in line["message"] for line in mine), mine
    assert any(line["logger"].startswith("workers.") for line in worker_lines)


def test_celery_events_and_inspect_see_the_worker(stack, zsre):
    app = settings.make_app(stack.url)
    replies = app.control.inspect(timeout=5).ping() or {}
    assert any(host.startswith(f"memoir-{NAME}@") for host in replies), replies
    cli = subprocess.run([str(Path(sys.executable).with_name("celery")), "--broker", stack.url, "inspect", "ping",
                          "--timeout", "5"], capture_output=True, text=True, timeout=60)  # as README says
    assert cli.returncode == 0 and f"memoir-{NAME}@" in cli.stdout, cli
    seen: list[dict] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        thread.start()
        time.sleep(1)  # the receiver is bound before the edit is sent
        outcome = stack.client.submit(zsre[4]["src"], zsre[4]["alt"], name=NAME, request_id="obs-4").wait(timeout=300)
        assert outcome["status"] == "applied"
        wait_until(lambda: any(e["type"] == "task-succeeded" and e.get("uuid") == "obs-4" for e in seen), 10,
                   "a task-succeeded event")
        receiver.should_stop = True
        thread.join(timeout=10)
    assert any(e["type"] == "worker-heartbeat" for e in seen) or any(e["type"] == "task-received" for e in seen)


def test_the_compose_healthcheck_sees_the_worker(stack):
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]

    def check(name: str) -> int:
        args = [sys.executable, *[a.replace("${MEMOIR_NAME:-default}", name) for a in test[2:]]]
        return subprocess.run(args, env={**os.environ, "MEMOIR_REDIS_URL": stack.url, "PYTHONPATH": str(REPO)},
                              timeout=60).returncode

    assert check(NAME) == 0
    assert check("nobody") == 1


def test_request_metrics_label_a_templated_route_by_its_template():
    """`/v1/edits/{edit_id}` is one label whatever the id; unknown paths are "other" (bounded)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.metrics import RequestMetrics, ServerMetrics

    metrics, app = ServerMetrics(), FastAPI()

    @app.get("/v1/edits/{edit_id}")
    async def edit(edit_id: str) -> dict:
        return {"id": edit_id}

    app.add_middleware(RequestMetrics, metrics=metrics, routes=lambda: set())
    with TestClient(app) as client:
        for path in ("/v1/edits/a", "/v1/edits/b", "/unknown/1", "/unknown/2"):
            client.get(path)
    lines = metrics.exposition()[0].decode().splitlines()
    assert 'memoir_http_requests_total{route="/v1/edits/{edit_id}",status="200"} 2.0' in lines
    assert 'memoir_http_requests_total{route="other",status="404"} 2.0' in lines
