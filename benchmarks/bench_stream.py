"""Ten thousand sequential edits: quality, false retrievals, retrieval time and index memory as
the memory grows, on a stream as a service receives it (memoir.synthetic: the zsRE dev split's
records, then template facts about invented entities).

    python -m benchmarks.bench_stream --model smollm2 --edits 1000 --store .cache/bench_stream/smollm2
                                      [--points 100,1000,3000,10000] [--sample 100] [--seed 0]
                                      [--device cpu] [--dtype float32] [--threads 1] [--name NAME]
                                      [--threshold T] [--top-k K]

Edits go through `workers.runtime.Runtime.apply_request`, the code path of `memoir apply` and of
the worker, into a real store (SQLite ledger + safetensors deltas, checkpoints every 100). The
ledger is the cursor: run the same command again after a stop and it continues after the last
edit the ledger holds (edit i has request id `stream-<seed>-<i>`; a request the ledger already
has is answered from it, never applied twice). Results already in the JSON are kept.

At each evaluation point T (the default points capped at --edits), on the memory as it stands:
- `sample`: --sample edits drawn (seeded by --seed and T) from the T applied so far, and `first`:
  the stream's first --sample edits (the same ones at every T: forgetting); each scored as
  memoir.evaluate does, teacher-forced Rel/Gen/Loc and generated rel_gen/gen_gen/loc_gen, split by
  origin (zsRE / synthetic) and overall; own-edit retrieval of src and rephrase;
- `unrelated`: the share of prompts that retrieve any edit, on the split's NQ questions outside the
  memory's background prompts, and on look-alike facts (same templates, other entities, never
  edited), with the share of look-alikes whose first 8 greedy tokens change (`answer_changed`);
  the best overlap ratios' quantiles (what a higher threshold would cut);
- `retrieval_ms`: the prefill decision (TopHash mask + overlap with every stored mask + best
  match, `ResidualMemory.decide`) per prompt, batches of 1 and of 16, median of repeats;
- `index`: bytes the in-memory mask index holds (tensors and Python objects reachable from it)
  per distinct stored mask; the process's RSS;
- `drift`: W_m's column norms (how many columns are used, how large) and the overlap of stored masks.
Writes benchmarks/results/<name>.json after every point (partial runs leave figures) and <name>.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import RESULTS_DIR, set_threads, write_result
from memoir import metrics, synthetic
from memoir.editor import _activations
from memoir.evaluate import ZsreCase, score

DEFAULT_POINTS = (100, 1000, 3000, 10000)
MEMORY_NAME = "stream"
SCORED = ("rel", "gen", "loc", "avg", "rel_gen", "gen_gen", "loc_gen", "avg_gen")


def request_id(seed: int, i: int) -> str:
    return f"stream-{seed}-{i:05d}"


def index_of(rid: str, seed: int) -> int:
    prefix = f"stream-{seed}-"
    if not rid.startswith(prefix) or not rid[len(prefix):].isdigit():
        raise SystemExit(f"error: the store holds request {rid!r}, not this stream's (seed {seed}): use another --store")
    return int(rid[len(prefix):])


def git_commit() -> str | None:
    """The checkout's commit (the index code a point was measured with), or None outside git."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def deep_bytes(obj: Any) -> dict[str, int]:
    """Bytes reachable from `obj`: tensor storages (each once) and Python objects (sys.getsizeof)."""
    seen: set[int] = set()
    storages: set[int] = set()
    total = {"tensor_bytes": 0, "python_bytes": 0}
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total["tensor_bytes"] += storage.nbytes()
            continue
        total["python_bytes"] += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.append(vars(item))
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, s) for s in item.__slots__ if hasattr(item, s))
    total["bytes"] = total["tensor_bytes"] + total["python_bytes"]
    return total


def quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4)

    return {"min": round(ordered[0], 4), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(ordered[-1], 4),
            "n": len(ordered)}


# ----------------------------------------------------------------------------------- scoring


def decisions(editor, prompts: Sequence[str], batch_size: int = 32) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """For each prompt, as the prefill decides it: the best stored row (-1 below the threshold), its
    overlap ratio, and the prompt's TopHash columns."""
    memory = editor.memory
    rows: list[int] = []
    ratios: list[float] = []
    columns: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = editor.batch(prompts[start : start + batch_size])
        acts = _activations(editor.model, memory, batch)
        decided = memory.decide(acts, batch.prompt_mask)
        rows += decided.rows.tolist()
        ratios += decided.ratios.tolist()
        columns += list(memory.columns_for(acts, batch.prompt_mask).cpu())
    return rows, ratios, columns


def own_retrieval(editor, prompts: Sequence[str], edit_ids: Sequence[int | None],
                  masks: dict[int, torch.Tensor]) -> dict[str, Any]:
    """How prompts retrieve their own edit: share whose decision holds it, and their overlap with
    their own stored mask (quantiles) against the best other overlap."""
    rows, ratios, columns = decisions(editor, prompts)
    memory, k = editor.memory, editor.memory.top_k
    own, own_ratio = [], []
    for row, cols, edit_id in zip(rows, columns, edit_ids):
        found = edit_id is not None and row >= 0 and edit_id in memory.index.edits(row)
        own.append(float(found))
        if edit_id is not None and edit_id in masks:
            own_ratio.append(torch.isin(cols, masks[edit_id].to(cols.device)).sum().item() / k)
    return {"share": sum(own) / len(own), "own_overlap": quantiles(own_ratio), "best_overlap": quantiles(ratios)}


def combine(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Weighted mean of scores computed on disjoint subsets (weights = subset sizes)."""
    total = sum(n for n, _ in parts)
    out: dict[str, Any] = {}
    for key, value in parts[0][1].items():
        if isinstance(value, (int, float)):
            out[key] = sum(n * p[key] for n, p in parts) / total
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {k: sum(n * p[key][k] for n, p in parts) / total for k in value}
    return out


def score_cases(editor, records: Sequence[dict[str, Any]], edit_ids: Sequence[int | None],
                masks: dict[int, torch.Tensor]) -> dict[str, Any]:
    """memoir.evaluate's scores of these records on the memory as it stands, by origin and overall."""
    groups: dict[str, list[int]] = {"zsre": [], "synthetic": []}
    for i, r in enumerate(records):
        groups["synthetic" if r.get("synthetic") else "zsre"].append(i)
    out: dict[str, Any] = {}
    parts = []
    for origin, members in groups.items():
        if not members:
            continue
        cases = [ZsreCase.from_record(records[i]) for i in members]
        got = score(editor, cases)
        got["retrieval"] = {
            "rel": own_retrieval(editor, [c.prompt for c in cases], [edit_ids[i] for i in members], masks)["share"],
            "gen": own_retrieval(editor, [c.rephrase for c in cases], [edit_ids[i] for i in members], masks)["share"],
            "loc": got["retrieval"]["loc"],
        }
        got["n"] = len(members)
        out[origin] = got
        parts.append((len(members), got))
    out["all"] = combine(parts)
    out["all"]["n"] = len(records)
    ids = list(edit_ids)
    out["all"]["own_retrieval"] = {
        "src": own_retrieval(editor, [r["src"] for r in records], ids, masks),
        "rephrase": own_retrieval(editor, [r["rephrase"] for r in records], ids, masks),
    }
    return out


def unrelated_share(editor, prompts: Sequence[str]) -> dict[str, Any]:
    rows, ratios, _ = decisions(editor, prompts)
    return {"share": sum(r >= 0 for r in rows) / len(prompts), "n": len(prompts), "best_overlap": quantiles(ratios)}


def retrieval_ms(editor, prompts: Sequence[str], repeats: int = 20) -> dict[str, float]:
    """Milliseconds per prompt of the prefill decision, from the prompts' activations."""
    memory = editor.memory
    out = {}
    for size in (1, 16):
        batch = editor.batch(list(prompts[:size]))
        acts = _activations(editor.model, memory, batch)
        memory.decide(acts, batch.prompt_mask)  # warm-up
        times = []
        for _ in range(repeats):
            if acts.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            memory.decide(acts, batch.prompt_mask)
            if acts.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3 / size)
        out[f"batch_{size}"] = round(statistics.median(times), 4)
        out[f"batch_{size}_max"] = round(max(times), 4)
    return out


def drift(editor, sample_masks: int = 500, seed: int = 0) -> dict[str, Any]:
    """W_m's column norms, and how stored masks overlap each other (a seeded sample of them)."""
    memory = editor.memory
    norms = memory.weight.float().norm(dim=0).cpu()
    used = norms[norms > 0]
    masks = editor.state(with_weight=False).masks
    ids = sorted(masks)
    rng = random.Random(seed)
    picked = [masks[i] for i in (ids if len(ids) <= sample_masks else rng.sample(ids, sample_masks))]
    size = memory.site.in_features
    dense = torch.zeros(len(picked), size)
    for i, cols in enumerate(picked):
        dense[i, cols] = 1.0
    pairs: list[float] = []
    if len(picked) >= 2:
        ratio = (dense @ dense.T) / memory.top_k
        upper = torch.triu_indices(len(picked), len(picked), 1)
        pairs = ratio[upper[0], upper[1]].tolist()
    usage = dense.sum(0) if len(picked) else torch.zeros(size)
    return {
        "columns_used": int((norms > 0).sum()), "columns": size,
        "column_norm": quantiles(used.tolist()) if used.numel() else {},
        "weight_fro": round(float(memory.weight.norm()), 4),
        "mask_pair_overlap": quantiles(pairs),
        "column_usage_in_sample": {"max": int(usage.max()), "mean": round(float(usage.mean()), 2)} if len(picked) else {},
        "distinct_masks": len(memory.index), "live_edits": memory.index.edit_count,
    }


# ---------------------------------------------------------------------------------- plotting


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result["points"].values(), key=lambda p: p["edits"])
    if not points:
        return
    t = [p["edits"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, label, colour in (("rel", "Rel", "C0"), ("gen", "Gen", "C1"), ("loc", "Loc", "C2")):
        ax.plot(t, [p["sample"]["all"][key] for p in points], "o-", color=colour, label=f"{label} (teacher-forced)")
        ax.plot(t, [p["sample"]["all"][f"{key}_gen"] for p in points], "x--", color=colour, label=f"{label} (generated)")
    ax.set_title(f"sample of {points[-1]['sample']['all']['n']} earlier edits")
    ax = axes[1]
    for key, label, colour in (("rel", "Rel", "C0"), ("gen", "Gen", "C1"), ("loc", "Loc", "C2")):
        ax.plot(t, [p["first"]["all"][key] for p in points], "o-", color=colour, label=f"{label} (teacher-forced)")
        ax.plot(t, [p["first"]["all"][f"{key}_gen"] for p in points], "x--", color=colour, label=f"{label} (generated)")
    ax.set_title("the stream's first edits, at every T (forgetting)")
    for ax in axes[:2]:
        ax.set_ylim(0, 1.02)
    ax = axes[2]
    ax.plot(t, [p["unrelated"]["nq"]["share"] for p in points], "o-", label="NQ questions retrieving an edit")
    ax.plot(t, [p["unrelated"]["lookalike"]["share"] for p in points], "s-", label="unedited look-alike facts retrieving one")
    changed = [(p["edits"], p["unrelated"]["lookalike"]["answer_changed"]) for p in points
               if "answer_changed" in p["unrelated"]["lookalike"]]
    if changed:
        ax.plot(*zip(*changed), "x--", label="look-alikes whose answer changes")
    ax.axhline(0.05, color="grey", linestyle=":", label="target 5 %")
    ax.set_ylim(0, max(0.1, max(p["unrelated"]["lookalike"]["share"] for p in points) * 1.1))
    ax.set_title("false retrievals")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("sequential edits T")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MEMOIR, {result['model']}, threshold {result['threshold']:g}, stream seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- main


def evaluate_point(runtime, stream: list[dict[str, Any]], done: int, args, nq: list[str],
                   lookalike: list[str]) -> dict[str, Any]:
    editor = runtime.editor
    started = time.perf_counter()
    ids_by_index: dict[int, int | None] = {}
    for i in range(done):
        ids_by_index[i] = None
    for edit in runtime.store.edits(MEMORY_NAME, status="applied"):
        if edit.request_id.startswith(f"stream-{args.seed}-"):
            ids_by_index[index_of(edit.request_id, args.seed)] = edit.id
    masks = editor.state(with_weight=False).masks
    n = min(args.sample, done)
    sample = sorted(random.Random(f"sample-{args.seed}-{done}").sample(range(done), n))
    first = list(range(n))
    point: dict[str, Any] = {"edits": done}
    point["sample"] = score_cases(editor, [stream[i] for i in sample], [ids_by_index[i] for i in sample], masks)
    point["first"] = point["sample"] if sample == first else score_cases(
        editor, [stream[i] for i in first], [ids_by_index[i] for i in first], masks)
    point["unrelated"] = {"nq": unrelated_share(editor, nq), "lookalike": unrelated_share(editor, lookalike)}
    # what a false retrieval costs a user: look-alike questions whose first greedy tokens change
    point["unrelated"]["lookalike"]["answer_changed"] = 1.0 - sum(
        metrics.generation_unchanged(editor, lookalike)) / len(lookalike)
    point["retrieval_ms"] = retrieval_ms(editor, nq)
    gc.collect()
    index = deep_bytes(editor.memory.index)
    distinct = max(1, len(editor.memory.index))
    point["index"] = {**index, "distinct_masks": len(editor.memory.index),
                      "bytes_per_mask": round(index["bytes"] / distinct, 1)}
    if hasattr(editor.memory.index, "nbytes"):  # the index's own count of its mask storage
        point["index"]["mask_storage_bytes"] = int(editor.memory.index.nbytes)
    point["commit"] = git_commit()
    point["rss_mb"] = round(rss_mb(), 1)
    point["drift"] = drift(editor, seed=args.seed)
    point["applied"] = sum(v is not None for v in ids_by_index.values())
    point["failed"] = done - point["applied"]
    point["eval_seconds"] = round(time.perf_counter() - started, 1)
    return point


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--store", required=True, help="store directory (or database URL): the run's ledger")
    parser.add_argument("--points", default=",".join(map(str, DEFAULT_POINTS)))
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the stream's seed (and the samples')")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16); W_m stays fp32")
    parser.add_argument("--threshold", type=float, default=None, help="retrieval threshold (default: fitted)")
    parser.add_argument("--top-k", type=int, default=None, help="columns per edit (default: 0.286 D)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="results name (default bench_stream_<model>)")
    parser.add_argument("--lookalikes", type=int, default=200, help="unedited look-alike facts for false retrievals")
    args = parser.parse_args(argv)
    if args.edits < 1 or args.sample < 1:
        parser.error("--edits and --sample must be >= 1")
    points = sorted({min(int(p), args.edits) for p in args.points.split(",") if p.strip()} | {args.edits})
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    name = args.name or f"bench_stream_{Path(str(args.model)).name}"
    results_path = RESULTS_DIR / f"{name}.json"

    from workers.runtime import Runtime

    stream = synthetic.records(args.edits, seed=args.seed)
    runtime = Runtime.open(args.model, store=args.store, name=MEMORY_NAME, device=args.device, dtype=args.dtype,
                           threshold=args.threshold, top_k=args.top_k)
    editor = runtime.editor
    background = set(editor.background_prompts)
    nq = sorted({r["loc"] for r in synthetic.split_records()} - background)
    edited = {p for r in stream for p in (r["src"], r["rephrase"], *r.get("rephrases", []))}
    lookalike = [r["src"] for r in synthetic.records(args.lookalikes * 2, seed=args.seed + 10_000, include_split=False)
                 if r["src"] not in edited][: args.lookalikes]

    result: dict[str, Any] = {}
    if results_path.exists():
        previous = json.loads(results_path.read_text())
        if (previous.get("model"), previous.get("seed"), previous.get("store")) == (args.model, args.seed, args.store):
            result = previous
    result.update(model=args.model, seed=args.seed, store=args.store, device=args.device, dtype=args.dtype,
                  target_edits=args.edits, sample=args.sample, threshold=editor.config.threshold,
                  config=editor.config.to_dict(), stream_records=len(stream),
                  split_records=sum(not r.get("synthetic") for r in stream), nq_prompts=len(nq),
                  lookalike_prompts=len(lookalike))
    result.setdefault("points", {})
    result.setdefault("segments", [])

    try:
        newest = runtime.store.edits(MEMORY_NAME, limit=1)
        done = index_of(newest[0].request_id, args.seed) + 1 if newest else 0
        for outcome in runtime.resume():
            print(f"resumed edit {outcome['edit_id']}: {outcome['status']}", file=sys.stderr, flush=True)
    except BaseException:
        runtime.close()
        raise
    print(f"{name}: {done} of {args.edits} edits in the ledger {args.store}; points {points}; "
          f"threshold {editor.config.threshold}", file=sys.stderr, flush=True)

    def save() -> None:
        write_result(name, result)
        plot(result, RESULTS_DIR / f"{name}.png")

    def maybe_evaluate() -> None:
        if done in points and str(done) not in result["points"]:
            print(f"  evaluating at T = {done}", file=sys.stderr, flush=True)
            point = evaluate_point(runtime, stream, done, args, nq, lookalike)
            result["points"][str(done)] = point
            s, u = point["sample"]["all"], point["unrelated"]
            print(f"  T={done}: rel {s['rel']:.3f} gen {s['gen']:.3f} loc {s['loc']:.3f} | rel_gen {s['rel_gen']:.3f} "
                  f"gen_gen {s['gen_gen']:.3f} loc_gen {s['loc_gen']:.3f} | unrelated NQ {u['nq']['share']:.3f} "
                  f"look-alike {u['lookalike']['share']:.3f} | decide {point['retrieval_ms']['batch_16']:.3f} ms/prompt "
                  f"| index {point['index']['bytes_per_mask']:.0f} B/mask | rss {point['rss_mb']:.0f} MB "
                  f"| {point['eval_seconds']:.0f} s", file=sys.stderr, flush=True)
            save()
        elif done in points:
            print(f"  T = {done} already in {results_path}", file=sys.stderr, flush=True)

    missed = [p for p in points if p < done and str(p) not in result["points"]]
    if missed:
        print(f"  warning: points {missed} were passed without being scored (the run stopped in between)",
              file=sys.stderr, flush=True)
    try:
        maybe_evaluate()
        segment = {"from": done, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edit_seconds": 0.0,
                   "edits": 0, "failed": 0}
        result["segments"].append(segment)
        wall = time.perf_counter()
        while done < args.edits:
            record = stream[done]
            outcome = runtime.apply_request({
                "prompt": record["src"], "target": record["alt"], "rephrases": record.get("rephrases", [record["rephrase"]]),
                "metadata": {k: record[k] for k in ("subject", "relation") if k in record},
                "request_id": request_id(args.seed, done)})
            done += 1
            segment["edits"] += 1
            segment["edit_seconds"] += outcome.get("seconds") or 0.0
            if outcome["status"] != "applied":
                segment["failed"] += 1
                print(f"  edit {done - 1} {outcome['status']}: {outcome['reason']}", file=sys.stderr, flush=True)
            if done % 25 == 0 or done == args.edits:
                spent = time.perf_counter() - wall
                print(f"  {done}/{args.edits} edits, {spent / segment['edits']:.2f} s/edit this run, "
                      f"rss {rss_mb():.0f} MB, {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
            segment["to"] = done
            segment["wall_seconds"] = round(time.perf_counter() - wall, 1)
            if done % 100 == 0 and done not in points:
                write_result(name, result)  # progress (segments) survives a stop between points
            maybe_evaluate()
        save()
    finally:
        runtime.close()
    summary = {k: {"sample": {m: round(v["sample"]["all"][m], 3) for m in SCORED},
                   "unrelated_nq": v["unrelated"]["nq"]["share"], "lookalike": v["unrelated"]["lookalike"]["share"],
                   "decide_ms": v["retrieval_ms"]["batch_16"], "bytes_per_mask": v["index"]["bytes_per_mask"]}
               for k, v in sorted(result["points"].items(), key=lambda kv: int(kv[0]))}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
