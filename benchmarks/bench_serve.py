"""Throughput of the HTTP endpoint (`memoir serve`) with the memory and without it.

    python -m benchmarks.bench_serve [--edits 20] [--requests 96] [--concurrency 8] [--max-tokens 16]
                                     [--repeats 8] [--max-batch 8] [--threshold 0.4]

The built-in trained tiny Llama on the CPU. A memory gets `--edits` real zsRE edits (in-process,
into a temporary store); one `memoir serve` process serves it (pinned, so nothing reloads
during the run), and `--concurrency` client threads send `--requests` non-streaming
/v1/completions requests per round, half of them edited prompts and half unrelated ones,
greedy, exactly `--max-tokens` tokens each (`ignore_eos`: the same work in both variants). Rounds alternate between the memory on and the
memory off (`"use_memory": false`: the same process, model and batching, the base model's
output), so both see the same machine load. Reported: requests/s and generated tokens/s per
variant (wall clock), tokens per CPU-second of the server process (the steadier figure on a
shared CPU), the per-round ratios memory/base (median, min, max), and how many prompts
retrieved an edit. Writes benchmarks/results/bench_serve.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import interleaved, ratios, show, spread, write_result
from memoir import MemoirConfig
from memoir.tinymodel import zsre_records
from workers.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
NAME = "bench"
UNRELATED = slice(300, 400)  # zsRE records whose questions are not edited
KEYS = ("requests_per_s", "tokens_per_s", "tokens_per_cpu_s")


def build_store(path: str, edits: int, threshold: float) -> list[dict[str, Any]]:
    """A memory with `edits` zsRE edits; returns the records edited."""
    records = zsre_records()[:edits]
    with Runtime.open("builtin", path, name=NAME, config=MemoirConfig(check_size=1, threshold=threshold)) as runtime:
        for n, record in enumerate(records):
            outcome = runtime.apply_request({"prompt": record["src"], "target": record["alt"], "request_id": f"b{n}"})
            if outcome["status"] != "applied":
                raise RuntimeError(f"edit {n} failed: {outcome['reason']}")
    return records


def start_server(store: str, at_seq: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model", "builtin", "--name", NAME, "--store", store,
               "--port", "0", "--at-seq", str(at_seq), "--max-batch", str(max_batch), "--loglevel", "WARNING"]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in server.stdout:
        if line.startswith("memoir serve ready:"):
            return server, line.split()[3]
    raise RuntimeError(f"the server exited with {server.wait()}")


def complete(url: str, prompt: str, max_tokens: int, use_memory: bool) -> dict[str, Any]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "use_memory": use_memory,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(url: str, pid: int, prompts: list[str], concurrency: int, max_tokens: int,
              use_memory: bool) -> dict[str, float]:
    """Send every prompt (at most `concurrency` in flight): wall and server CPU seconds, tokens, retrievals."""
    with ThreadPoolExecutor(concurrency) as pool:
        started, cpu = time.perf_counter(), cpu_seconds(pid)
        answers = list(pool.map(lambda p: complete(url, p, max_tokens, use_memory), prompts))
        seconds, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    retrieved = sum(1 for a in answers if a["memoir"]["retrieved"][0])
    return {"seconds": seconds, "requests_per_s": len(prompts) / seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "retrieved": retrieved}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--requests", type=int, default=96, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8, help="measured rounds per variant")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="the memory's retrieval threshold (0.4, the paper's, as in the figures recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        store = str(Path(tmp) / "store")
        print(f"applying {args.edits} edits ...", file=sys.stderr, flush=True)
        edited = [r["src"] for r in build_store(store, args.edits, args.threshold)]
        unrelated = [r["src"] for r in zsre_records()[UNRELATED]]
        prompts = [(edited if n % 2 == 0 else unrelated)[(n // 2) % len(edited if n % 2 == 0 else unrelated)]
                   for n in range(args.requests)]
        server, url = start_server(store, args.edits, args.max_batch)
        try:
            samples = interleaved({
                "memory": lambda: one_round(url, server.pid, prompts, args.concurrency, args.max_tokens, True),
                "base": lambda: one_round(url, server.pid, prompts, args.concurrency, args.max_tokens, False),
            }, repeats=args.repeats)
        finally:
            server.terminate()
            server.wait(timeout=60)

    result: dict[str, Any] = {"settings": vars(args)}
    for name, rounds in samples.items():
        result[name] = {key: spread([r[key] for r in rounds]) for key in KEYS}
        result[name]["retrieved_per_round"] = rounds[0]["retrieved"]
        result[name]["tokens_per_round"] = spread([r["tokens"] for r in rounds])
        print(show(f"{name:>6} requests/s", [r["requests_per_s"] for r in rounds], digits=2))
        print(show(f"{name:>6} tokens/s", [r["tokens_per_s"] for r in rounds], digits=1))
        print(show(f"{name:>6} tokens per server CPU-second", [r["tokens_per_cpu_s"] for r in rounds], digits=1))
    for key in KEYS:
        values = ratios([r[key] for r in samples["memory"]], [r[key] for r in samples["base"]])
        result[f"ratio_{key}"] = spread(values)
        print(show(f"memory/base {key}", values))
    print(f"prompts retrieving an edit per round: memory {samples['memory'][0]['retrieved']} of {args.requests}")
    print(f"wrote {write_result('bench_serve', result)}")


if __name__ == "__main__":
    main()
