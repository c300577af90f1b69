"""Scale: restarting a worker, verifying the ledger and checkpointing with 1 000 and 10 000 edits on
SmolLM2, and the retrieval index at 10 000 masks (issue 15 §1-§2).

    python -m benchmarks.bench_restart [--edits 1000 10000] [--model smollm2] [--dir /tmp]
                                       [--repeats 3] [--rank 200] [--skip-warm] [--skip-index] [--keep] [--label NAME]

The stores are built cheaply: training 10 000 edits would take ~14 h here (5 s each), so each
edit is a random but valid one written through the store's own write path (record_request,
mark_applying, mark_applied: the delta file written and fsynced, then the ledger row), with a
TopHash-shaped mask (k = 439 distinct sorted columns of D = 1536, what `topk_columns` returns for
a random feature) and a factored delta G·Aᵀ over `--rank` positions (default 200: real SmolLM2
edits on zsRE span 197-219 positions, ~800 KB a delta file; 10 000 of them are 8 GB, so give
`--dir` a disk with room). The memory itself (π, μ, prefixes, fitted threshold) is made
by `Runtime.open` on the real model; a checkpoint is taken every `DEFAULT_CHECKPOINT_EVERY` (25)
changes of W_m and the newest 3 kept, as a worker does. Then, each in a fresh process (median of `--repeats`):

- bare model load: `load_model(model)`, the floor of any restart;
- restart to ready: what `memoir worker` does between its imports and Celery's start:
  `Runtime.open` (model, writer lock, newest checkpoint + later deltas, index), `resume()`; and,
  apart, `activations.warm` (the activation cache for rollbacks; see BENCHMARKS.md);
- `memoir ledger verify --json` (the CLI, no torch, in the environment as a user has it: no
  OMP_NUM_THREADS): wall time and peak RSS (/usr/bin/time);
- a checkpoint of W_m with its index (`Store.checkpoint`), taken after loading.

Index (no model): 10 000 random k-of-D masks at D = 1536 (k = 439, SmolLM2) and D = 14 336
(k = 4096, Llama-3-8B), the index's bytes per mask and the retrieval time per prompt (one prompt,
and a batch of 8), against the dense fp32 index it replaced (the same decisions, by a matrix
product). Results: benchmarks/results/bench_restart[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

NAME = "bench"
RANK = 200  # token positions a real SmolLM2 edit's delta G·Aᵀ spans (197-219 measured on zsRE edits): ~800 KB


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- building a store --------------------------------------------------------------------------


def build(root: Path, model: str, edits: int, seed: int = 0, rank: int = RANK) -> dict[str, Any]:
    import torch

    from memoir import EditDelta, EditResult
    from store import Store
    from workers.runtime import Runtime

    started = time.perf_counter()
    with Runtime.open(model, store=root, name=NAME) as runtime:  # the default checkpoint interval
        memory = runtime.editor.memory
        d, size, k = memory.site.out_features, memory.site.in_features, memory.top_k
    made = time.perf_counter() - started
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(d, size)
    store = Store.open(root)
    store.writer_lock(NAME)
    started = time.perf_counter()
    for n in range(1, edits + 1):
        edit, _ = store.record_request(NAME, f"r{n}", f"synthetic prompt {n}", f"target {n}")
        store.mark_applying(edit)
        mask = torch.randperm(size, generator=gen)[:k].sort().values
        delta = EditDelta.from_factors(mask, torch.randn(d, rank, generator=gen) * 1e-3,
                                       torch.randn(k, rank, generator=gen))
        store.mark_applied(edit, EditResult(edit.id, edit.prompt, edit.target, delta, [2.0, 0.01], 2, 0.01,
                                            "unrelated", {"rel": 1.0, "loc": 1.0}))
        delta.apply_to(weight, 1.0)
        if store.checkpoint_due(NAME):
            store.checkpoint(NAME, weight)
            store.prune_checkpoints(NAME, 3)
        if n % 1000 == 0:
            print(f"  built {n}/{edits} edits", file=sys.stderr, flush=True)
    written = time.perf_counter() - started
    store.close()
    return {"edits": edits, "rank": rank, "d": d, "D": size, "k": k, "memory_created_s": made, "edits_written_s": written,
            "tensor_bytes": sum(p.stat().st_size for p in (root / "tensors").rglob("*") if p.is_file())}


# -- child processes: one measurement each ----------------------------------------------------------


def child(kind: str, root: str, model: str) -> dict[str, Any]:
    """Runs in a fresh process; prints one JSON line."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 - what the worker has imported before it loads anything
    from transformers import AutoModelForCausalLM  # noqa: F401

    from memoir.sources import load_model
    from workers import activations
    from workers.runtime import Runtime

    out: dict[str, Any] = {"rss_imports_mb": _rss_mb()}
    if kind == "bare":
        t0 = time.perf_counter()
        load_model(model)
        out["load_s"] = time.perf_counter() - t0
    elif kind in ("restart", "warm"):
        import workers.runtime as runtime_module

        def timed_load(*args, **kwargs):  # the model's share of the restart, timed inside it
            started = time.perf_counter()
            try:
                return load_model(*args, **kwargs)
            finally:
                out["model_s"] = time.perf_counter() - started

        runtime_module.load_model = timed_load
        t0 = time.perf_counter()
        runtime = Runtime.open(model, store=root, name=NAME)
        t1 = time.perf_counter()
        runtime.resume()
        out["restart_s"] = time.perf_counter() - t0
        out["open_s"] = t1 - t0
        out["memory_s"] = out["restart_s"] - out["model_s"]  # all but the model: store, checkpoint, deltas, index
        out["rss_ready_mb"] = _rss_mb()
        index = runtime.editor.memory.index
        out["index"] = {"masks": len(index), "bytes": index.nbytes}
        t0 = time.perf_counter()
        runtime.store.load_state(NAME)
        out["load_state_s"] = time.perf_counter() - t0
        if kind == "warm":
            t0 = time.perf_counter()
            ids = list(runtime.store.applied_masks(NAME))[-activations.WARM_EDITS :]  # what a start captures at most
            out["warmed"] = activations.activation_cache(runtime.editor).ensure_ids(runtime.store, NAME, ids)
            out["warm_at_start"] = activations.warm(runtime)  # 0 above WARM_EDITS live edits
            out["warm_s"] = time.perf_counter() - t0
            out["rss_warm_mb"] = _rss_mb()
        runtime.close()
    elif kind == "checkpoint":
        from store import Store

        store = Store.open(root)
        store.writer_lock(NAME)
        weight = store.load_state(NAME).weight
        t0 = time.perf_counter()
        record = store.checkpoint(NAME, weight)
        out["checkpoint_s"] = time.perf_counter() - t0
        out["checkpoint_bytes"] = record.bytes
        store.prune_checkpoints(NAME, 3)
        store.close()
    out["rss_peak_mb"] = _rss_mb()
    return out


def run_child(kind: str, root: Path, model: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_restart", "--child", kind, str(root), model],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_verify(root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # as users run it
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "pipeline.cli", "ledger",
                           "verify", "--store", str(root), "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = [line for line in proc.stderr.splitlines() if line.startswith("MAXRSS ")]
    return {"verify_s": wall, "rss_peak_mb": int(rss[-1].split()[1]) / 1024 if rss else None, "exit": proc.returncode,
            "ok": report.get("ok"), "errors": len(report.get("errors", [])), "checked": report.get("checked")}


def median_of(samples: list[dict[str, Any]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def scale(root: Path, model: str, edits: int, repeats: int, warm: bool, rank: int = RANK) -> dict[str, Any]:
    if (root / "ledger.db").exists():  # kept from an earlier run (--keep): measured again as it is
        out: dict[str, Any] = {"build": {"edits": edits, "reused": str(root)}}
    else:
        out = {"build": build(root, model, edits, rank=rank)}
        print(f"  {edits} edits: built in {out['build']['edits_written_s']:.0f} s", file=sys.stderr, flush=True)
    bare, restart = [], []
    for _ in range(repeats):  # taking turns, so that a busy moment of the shared machine hits both
        bare.append(run_child("bare", root, model))
        restart.append(run_child("restart", root, model))
    out["bare"] = {"load_s": [s["load_s"] for s in bare], "median_s": median_of(bare, "load_s"),
                   "rss_peak_mb": median_of(bare, "rss_peak_mb")}
    out["restart"] = {"restart_s": [s["restart_s"] for s in restart], "median_s": median_of(restart, "restart_s"),
                      "model_s": [s["model_s"] for s in restart], "memory_s": [s["memory_s"] for s in restart],
                      "memory_median_s": median_of(restart, "memory_s"),
                      "load_state_s": median_of(restart, "load_state_s"), "rss_ready_mb": median_of(restart, "rss_ready_mb"),
                      "index": restart[0]["index"]}
    out["restart_over_bare"] = out["restart"]["median_s"] / out["bare"]["median_s"]
    # steadier on a shared machine: the bare load plus what a restart adds to its own model load
    out["restart_over_bare_by_parts"] = (out["bare"]["median_s"] + out["restart"]["memory_median_s"]) / out["bare"]["median_s"]
    verifies = [run_verify(root) for _ in range(repeats)]
    out["verify"] = {"verify_s": [v["verify_s"] for v in verifies], "median_s": median_of(verifies, "verify_s"),
                     "rss_peak_mb": max(v["rss_peak_mb"] or 0 for v in verifies), "ok": verifies[0]["ok"],
                     "errors": verifies[0]["errors"], "checked": verifies[0]["checked"]}
    checkpoints = [run_child("checkpoint", root, model) for _ in range(repeats)]
    out["checkpoint"] = {"checkpoint_s": [c["checkpoint_s"] for c in checkpoints],
                         "median_s": median_of(checkpoints, "checkpoint_s"), "bytes": checkpoints[0]["checkpoint_bytes"],
                         "rss_peak_mb": max(c["rss_peak_mb"] for c in checkpoints)}
    if warm:
        out["warm"] = run_child("warm", root, model)
    return out


# -- the index alone ------------------------------------------------------------------------------


def index_figures(size: int, k: int, masks: int = 10_000, repeats: int = 200) -> dict[str, Any]:
    import numpy as np
    import torch

    from memoir.tophash import MaskIndex, dense_masks, pack_columns

    torch.set_num_threads(1)
    gen = np.random.default_rng(size)
    columns = torch.from_numpy(np.argsort(gen.random((masks, size), dtype=np.float32), axis=1)[:, :k]).sort(dim=1).values
    words = pack_columns(columns, size)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = MaskIndex(size, k)
    index.add_many(range(masks), words)
    python_bytes = tracemalloc.get_traced_memory()[0] - before  # dicts, digests, sets (numpy/torch buffers aside)
    tracemalloc.stop()
    queries = torch.cat([columns[:4], torch.from_numpy(np.argsort(gen.random((4, size)), axis=1)[:, :k]).sort(dim=1).values])

    def per_prompt(fn, batch: int) -> float:
        times = []
        for r in range(repeats // batch * 2 + 5):
            t0 = time.perf_counter()
            fn(queries[:batch])
            times.append((time.perf_counter() - t0) / batch)
        return statistics.median(times[3:]) * 1e3

    packed_one = per_prompt(index.best_columns, 1)
    packed_eight = per_prompt(index.best_columns, 8)
    dense = dense_masks(columns, size)  # the index before: (n, D) fp32 rows, a matrix product

    def dense_best(query_columns):
        return ((dense_masks(query_columns, size) @ dense.T) / k).max(dim=-1)

    rows, ratios = index.best_columns(queries)
    want = dense_best(queries)
    assert torch.equal(rows, want.indices) and torch.equal(ratios, want.values)
    dense_one = per_prompt(dense_best, 1)
    dense_eight = per_prompt(dense_best, 8)
    return {"D": size, "k": k, "masks": masks, "packed_bytes_per_mask": index.nbytes / masks,
            "python_bytes_per_mask": python_bytes / masks,
            "bytes_per_mask": (index.nbytes + python_bytes) / masks, "dense_bytes_per_mask": size * 4,
            "retrieval_ms_per_prompt": {"packed_1": packed_one, "packed_batch8": packed_eight,
                                        "dense_1": dense_one, "dense_batch8": dense_eight},
            "same_decisions_as_dense": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=RANK, help="token positions of each synthetic delta")
    parser.add_argument("--skip-warm", action="store_true", help="do not measure activations.warm")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--label", default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep each store in DIR/bench_restart-N (one found there is measured again, not rebuilt)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ROOT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from benchmarks.common import machine, write_result

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: dict[str, Any] = {"model": args.model, "repeats": args.repeats, "rank": args.rank, "scale": {}, "index": []}
    if not args.skip_index:
        for size, k in ((1536, 439), (14336, 4096)):
            results["index"].append(index_figures(size, k))
            print(json.dumps(results["index"][-1]), file=sys.stderr, flush=True)
    for edits in args.edits:
        if args.keep:  # the store stays, for a look afterwards
            root = Path(args.dir) / f"bench_restart-{edits}"
            results["scale"][str(edits)] = scale(root, args.model, edits, args.repeats, not args.skip_warm, args.rank)
            continue
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            results["scale"][str(edits)] = scale(Path(tmp) / "store", args.model, edits, args.repeats,
                                                 not args.skip_warm, args.rank)
        print(json.dumps(results["scale"][str(edits)]), file=sys.stderr, flush=True)
    results["machine"] = machine()
    path = write_result("bench_restart" + (f"-{args.label}" if args.label else ""), results)
    print(path)


if __name__ == "__main__":
    main()
