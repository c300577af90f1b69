"""Quality on a real model, as users see it: zsRE edits applied one after another to SmolLM2-135M
(or the built-in tiny model), scored teacher-forced (Rel/Gen/Loc, the field's metrics) and from
generated answers (rel_gen/gen_gen/loc_gen), at the memory's defaults (no flags: the threshold is
fitted to the model).

    python -m benchmarks.bench_real [--model smollm2] [--limit 100] [--every 25] [--name bench_real_smollm2]
                                    [--speed 5] [--threads N] [--runs in_order distinct_subjects speed]

Runs, on the shipped dev split (records in order; the threshold rule was tuned on records 200-399,
never on the reported ones):
- `in_order`: the first --limit valid records edited in order (zsRE repeats subjects: a later
  record can re-edit the same fact with another target), scored after every --every edits;
- `distinct_subjects`: the first --limit records with distinct subjects, the generated-answer
  targets' setting;
- `speed` (with --speed N > 0): N edits on the fast path against the same N on the full forward,
  in one process, seconds per edit and the ratio.
Writes benchmarks/results/<name>.json and <name>.png (the in-order curve). `--runs` picks some of
them (e.g. to run them as two processes side by side on two cores, with --threads 1 and two names).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from benchmarks.common import RESULTS_DIR, set_threads, write_result
from memoir import Editor, MemoirConfig
from memoir.evaluate import evaluate, split_records
from memoir.sources import load_model
from memoir.tinymodel import zsre_records


def quality(model_name: str, limit: int, every: int | None, distinct_subjects: bool) -> dict[str, Any]:
    model, tokenizer, _ = load_model(model_name)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"  {done}/{total} edits, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    result = evaluate(model, tokenizer, zsre_records(), limit=limit, every=every, progress=progress,
                      distinct_subjects=distinct_subjects)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def speed(model_name: str, edits: int) -> dict[str, Any]:
    """Seconds per edit, fast path and full forward, on the same edits of fresh memories, alternating."""
    cases, _, background = split_records(zsre_records(), edits)
    seconds: dict[str, list[float]] = {"fast": [], "full": []}
    editors = {}
    for variant in ("fast", "full"):
        model, tokenizer, _ = load_model(model_name)
        editors[variant] = Editor.create(model, tokenizer, background, MemoirConfig(), fast=variant == "fast")
    for i, case in enumerate(cases):
        for variant, editor in editors.items():
            started = time.perf_counter()
            editor.edit(case.prompt, case.target, edit_id=i, score=False)
            seconds[variant].append(time.perf_counter() - started)
    fast, full = sum(seconds["fast"]) / edits, sum(seconds["full"]) / edits
    return {"edits": edits, "seconds_per_edit": {"fast": fast, "full": full}, "speedup": full / fast,
            "per_edit": seconds}


def plot(curve: list[dict[str, Any]], path, title: str) -> None:
    from workers.eval_command import plot_curve

    plot_curve(curve, str(path), title)


def row(label: str, r: dict[str, Any]) -> str:
    return (f"| {label} | {r['edits']} | {r['rel']:.3f} | {r['gen']:.3f} | {r['loc']:.3f} | "
            f"{r['rel_gen']:.3f} | {r['gen_gen']:.3f} | {r['loc_gen']:.3f} | {r['retrieval']['loc']:.3f} |")


RUNS = ("in_order", "distinct_subjects", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--speed", type=int, default=5, help="edits timed fast vs full (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    name = args.name or f"bench_real_{args.model}"
    payload: dict[str, Any] = {"model": args.model, "limit": args.limit}
    table = []
    if "in_order" in args.runs:
        print(f"in order: {args.limit} edits", file=sys.stderr)
        payload["in_order"] = quality(args.model, args.limit, args.every, distinct_subjects=False)
        write_result(name, payload)
        plot(payload["in_order"]["curve"], RESULTS_DIR / f"{name}.png",
             f"MEMOIR on zsRE, {args.model}, threshold {payload['in_order']['config']['threshold']:g}")
        table.append(row("in order", payload["in_order"]))
    if "distinct_subjects" in args.runs:
        print(f"distinct subjects: {args.limit} edits", file=sys.stderr)
        payload["distinct_subjects"] = quality(args.model, args.limit, None, distinct_subjects=True)
        write_result(name, payload)
        table.append(row("distinct subjects", payload["distinct_subjects"]))
    if "speed" in args.runs and args.speed:
        payload["speed"] = speed(args.model, args.speed)
    path = write_result(name, payload)
    print("| run | T | Rel | Gen | Loc | rel_gen | gen_gen | loc_gen | loc retrieves |")
    print("| --- " * 9 + "|")
    print("\n".join(table))
    if "speed" in payload:
        s = payload["speed"]
        print(f"edit: fast {s['seconds_per_edit']['fast']:.2f} s, full {s['seconds_per_edit']['full']:.2f} s, "
              f"{s['speedup']:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
