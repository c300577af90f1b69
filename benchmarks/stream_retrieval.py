"""Why retrieval drifts over a long stream, and what keeps it up: retrieval simulated at 10 000 stored
masks, for several thresholds and prompt keys, without training a single edit.

    python -m benchmarks.stream_retrieval --model builtin [--edits 10000] [--seed 1] [--points ...]
                                          [--keys mean,last,mean_stream_mu] [--name NAME]

A prompt's TopHash mask is computed from the edited layer's input with the memory off, so which
edit a prompt retrieves depends only on the stored masks, never on what the edits learnt: the
retrieval of a 10 000-edit memory can be replayed from the edits' prompts alone. For the stream of
`--seed` (memoir.synthetic; use a seed other than the reported run's), at each T:
- own: the share of edits' rephrases whose best stored mask is their own edit's and passes the
  threshold (Gen needs it), `wrong`: the share whose best mask, past the threshold, is another
  edit's (a wrong fact is applied);
- false: the share of unrelated NQ questions, and of unedited look-alike facts (the same templates
  about other entities), that retrieve any edit;
each over a grid of thresholds, for the memory's fitted threshold and a threshold refitted to the
number of stored masks (capacity = T), and for other prompt keys:
- `mean`: MEMOIR's (mean of the prompt tokens' activations minus the background mean μ);
- `last`: the last prompt token's activation minus μ;
- `mean_stream_mu` / `last_stream_mu`: the same, minus a μ taken over the background prompts plus
  400 template questions of yet another seed (the traffic a service sees, not only NQ questions).
- `idf` / `idf_stream_mu`: the mean over the prompt's tokens weighted by each token's inverse
  document frequency in those same background + template prompts (log((N+1)/(df+1)) + 1): the
  words every question of a relation shares (the template) weigh less than the entity's own.
`crosstalk`: per pair of the first 300 edits' prompts, the cosine of their mean activations on the
columns both masks hold, raw (what W_m multiplies) and with μ taken off.
`index`: the memory's own index filled with the stream's masks: bytes per mask, decide ms per prompt.
`at_5pct_false`: per key, the lowest threshold of the grid where at most 5 % of the NQ questions and
of the look-alikes retrieve an edit at the largest T, and what the rephrases get there.
Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import set_threads, write_result
from memoir import Editor, MemoirConfig, synthetic
from memoir.sources import load_model
from memoir.tophash import fit_threshold, topk_columns

KEYS = ("mean", "last", "idf", "mean_stream_mu", "last_stream_mu", "idf_stream_mu")


class _Captured(Exception):
    pass


def layer_input(editor: Editor, batch) -> torch.Tensor:
    """The edited projection's input (B, T, D), memory off; the forward stops there (the layers
    above and the LM head are not run: same values as memoir.editor._activations, less work)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach())
        raise _Captured

    handle = editor.memory.base.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), editor.memory.disabled():
            editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def crosstalk(feats: torch.Tensor, masks: torch.Tensor, mu: torch.Tensor) -> dict[str, float]:
    """How much one edit's change to W_m reaches another edit's prompt: per pair of prompts, the
    cosine of their activations on the columns both masks hold, raw (what W_m multiplies) and
    with μ taken off. Quantiles over the pairs."""
    out = {}
    for name, a in (("raw", feats), ("centred", feats - mu)):
        ma = masks * a
        num = ma @ ma.T
        sq = (masks * a * a) @ masks.T  # Σ over shared columns of a_i²
        cos = num / (sq * sq.T).clamp_min(1e-12).sqrt()
        upper = torch.triu_indices(a.shape[0], a.shape[0], 1)
        pairs = cos[upper[0], upper[1]]
        out[name] = {"mean": round(float(pairs.mean()), 4), "p10": round(float(pairs.quantile(0.1)), 4),
                     "p50": round(float(pairs.median()), 4), "p90": round(float(pairs.quantile(0.9)), 4)}
    return out


def idf_table(editor: Editor, documents: list[str]) -> torch.Tensor:
    """log((N + 1) / (df + 1)) + 1 per token id, df = how many of `documents` hold the token."""
    vocab = int(editor.model.get_input_embeddings().weight.shape[0])
    df = torch.zeros(vocab)
    for text in documents:
        df[torch.tensor(sorted(set(editor.codec.prompt_ids(text))), dtype=torch.long)] += 1
    return torch.log((len(documents) + 1) / (df + 1)) + 1


def raw_features(editor: Editor, prompts: list[str], idf: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per prompt, before μ is taken off: the mean of its tokens' activations ("mean"), its last
    token's ("last"), and the mean weighted by each token's idf ("idf"), each (len(prompts), D),
    from one forward per batch."""
    out: dict[str, list[torch.Tensor]] = {"mean": [], "last": [], "idf": []}
    for start in range(0, len(prompts), batch_size):
        batch = editor.batch(prompts[start : start + batch_size])
        acts = layer_input(editor, batch).float()
        mask = batch.prompt_mask.to(acts.device).float()
        last = mask.sum(1).long() - 1  # right padding: prompt tokens come first
        out["last"].append(acts[torch.arange(acts.shape[0]), last].cpu())
        out["mean"].append(((mask.unsqueeze(-1) * acts).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu())
        w = mask * idf.to(acts.device)[batch.input_ids.to(acts.device)]
        out["idf"].append(((w.unsqueeze(-1) * acts).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)).cpu())
    return {key: torch.cat(rows) for key, rows in out.items()}


def token_mean(editor: Editor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    total, tokens = None, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = editor.batch(prompts[start : start + batch_size])
        acts = layer_input(editor, batch).float()
        w = batch.prompt_mask.float().to(acts.device)
        part = torch.einsum("btd,bt->d", acts, w).cpu()
        total = part if total is None else total + part
        tokens += float(w.sum())
    return total / tokens


def dense(columns: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(columns.shape[0], size).scatter_(1, columns, 1.0)


def best(queries: torch.Tensor, stored: torch.Tensor, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    rows, ratios = [], []
    for start in range(0, queries.shape[0], chunk):
        r, i = ((queries[start : start + chunk] @ stored.T) / k).max(dim=1)
        rows.append(i)
        ratios.append(r)
    return torch.cat(rows), torch.cat(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1, help="the stream's seed (not the reported run's 0)")
    parser.add_argument("--points", default="100,300,1000,3000,10000")
    parser.add_argument("--rephrases", type=int, default=1000, help="edits whose rephrase is scored per point")
    parser.add_argument("--lookalikes", type=int, default=500)
    parser.add_argument("--keys", default=",".join(KEYS))
    parser.add_argument("--thresholds", default="0.40,0.44,0.48,0.50,0.52,0.54,0.56,0.58,0.60,0.62,0.64,0.66,0.68,0.70,0.72,0.76,0.80,0.90")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    name = args.name or f"stream_retrieval_{args.model}"
    points = sorted({min(int(p), args.edits) for p in args.points.split(",")})
    thresholds = [float(t) for t in args.thresholds.split(",")]
    started = time.perf_counter()

    from workers.runtime import default_background_prompts

    model, tokenizer, _ = load_model(args.model, device=args.device)
    background = default_background_prompts()
    editor = Editor.create(model, tokenizer, background, MemoirConfig())
    cfg, memory = editor.config, editor.memory
    size, k = memory.site.in_features, cfg.top_k
    stream = synthetic.records(args.edits, seed=args.seed)
    edited = {p for r in stream for p in (r["src"], r["rephrase"], *r.get("rephrases", []))}
    nq = sorted({r["loc"] for r in synthetic.split_records()} - set(background))
    lookalike = [r["src"] for r in synthetic.records(args.lookalikes * 2, seed=args.seed + 10_000, include_split=False)
                 if r["src"] not in edited][: args.lookalikes]
    traffic = [r["src"] for r in synthetic.records(400, seed=args.seed + 20_000, include_split=False)]
    log = lambda msg: print(f"  {msg} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)  # noqa: E731

    mus = {"mean": memory.background.cpu(), "last": memory.background.cpu()}
    mus["mean_stream_mu"] = token_mean(editor, list(background) + traffic)
    mus["last_stream_mu"] = mus["idf"] = mus["idf_stream_mu"] = mus["mean_stream_mu"]
    mus["idf"] = memory.background.cpu()
    idf = idf_table(editor, list(background) + traffic)
    chosen_at = {t: sorted(random.Random(f"{args.seed}-{t}").sample(range(t), min(args.rephrases, t))) for t in points}
    scored = sorted(set().union(*chosen_at.values()))
    position = {i: n for n, i in enumerate(scored)}  # stream index -> row among the scored rephrases
    prompt_sets = {"src": [r["src"] for r in stream], "rephrase": [stream[i]["rephrase"] for i in scored],
                   "nq": nq, "lookalike": lookalike, "background": list(background)}
    result: dict[str, Any] = {"model": args.model, "seed": args.seed, "edits": args.edits, "top_k": k, "size": size,
                              "fitted_threshold": cfg.threshold, "threshold_fit": cfg.threshold_fit,
                              "thresholds": thresholds, "points": points, "keys": {}}
    raw = {}
    for set_name, prompts in prompt_sets.items():
        raw[set_name] = raw_features(editor, prompts, idf)
        log(f"activations of {len(prompts)} {set_name} prompts")
    masks_mean = None
    for key in args.keys.split(","):
        base = key.split("_")[0]
        masks = {set_name: dense(topk_columns(feats[base] - mus[key], k, memory.permutation.cpu()), size)
                 for set_name, feats in raw.items()}
        if key == "mean":
            masks_mean = masks["src"]
        fit = fit_threshold(masks["background"], k, cfg.threshold_capacity, cfg.threshold_false_retrievals)
        per_key: dict[str, Any] = {"fit": fit, "points": {}}
        if key == "mean":
            n = min(300, len(stream))
            result["crosstalk"] = crosstalk(raw["src"]["mean"][:n], masks["src"][:n], mus["mean"])
            log(f"cross-talk of the first {n} edits' prompts on shared columns: {result['crosstalk']}")
        for t in points:
            stored = masks["src"][:t]
            fit_t = fit_threshold(masks["background"], k, t, cfg.threshold_false_retrievals)
            chosen = chosen_at[t]
            rephrase_masks = masks["rephrase"][[position[i] for i in chosen]]
            rows, ratios = best(rephrase_masks, stored, k)
            # an identical mask stored twice: the earliest row wins, so compare masks, not rows
            own_mask = (stored[rows] == stored[torch.tensor(chosen)]).all(dim=1)
            src_rows, src_ratios = best(masks["src"][chosen], stored, k)
            src_own = (stored[src_rows] == stored[torch.tensor(chosen)]).all(dim=1)
            _, nq_ratios = best(masks["nq"], stored, k)
            _, look_ratios = best(masks["lookalike"], stored, k)

            def at(th: float) -> dict[str, float]:
                passed = ratios >= th
                return {"own": round(float((passed & own_mask).float().mean()), 4),
                        "wrong": round(float((passed & ~own_mask).float().mean()), 4),
                        "src_own": round(float(((src_ratios >= th) & src_own).float().mean()), 4),
                        "false_nq": round(float((nq_ratios >= th).float().mean()), 4),
                        "false_lookalike": round(float((look_ratios >= th).float().mean()), 4)}

            per_key["points"][str(t)] = {
                "fitted": {"threshold": fit["threshold"], **at(fit["threshold"])},
                "refitted_to_T": {"threshold": fit_t["threshold"], **at(fit_t["threshold"])},
                "grid": {f"{th:g}": at(th) for th in thresholds},
                "rephrase_best_is_own": round(float(own_mask.float().mean()), 4),
                "rephrase_own_overlap_p50": round(float(((rephrase_masks * stored[chosen]).sum(1) / k).median()), 4),
                "nq_best_p99": round(float(nq_ratios.quantile(0.99)), 4),
                "lookalike_best_p50": round(float(look_ratios.median()), 4),
            }
            g = per_key["points"][str(t)]["fitted"]
            log(f"{key} T={t}: threshold {fit['threshold']}: rephrase own {g['own']:.3f} wrong {g['wrong']:.3f} "
                f"src own {g['src_own']:.3f} | false NQ {g['false_nq']:.3f} look-alike {g['false_lookalike']:.3f}")
        # the operating point: the lowest threshold of the grid where at most 5 % of unrelated NQ
        # questions and of unedited look-alikes retrieve an edit, at the largest T
        last = per_key["points"][str(points[-1])]["grid"]
        ok = [th for th in thresholds if last[f"{th:g}"]["false_nq"] <= 0.05 and last[f"{th:g}"]["false_lookalike"] <= 0.05]
        per_key["at_5pct_false"] = ({"threshold": ok[0], **{str(t): per_key["points"][str(t)]["grid"][f"{ok[0]:g}"]
                                                            for t in points}} if ok else None)
        log(f"{key}: lowest threshold with <= 5 % false retrievals at T={points[-1]}: "
            + (f"{ok[0]:g}, rephrase own {last[f'{ok[0]:g}']['own']:.3f}" if ok else "none in the grid"))
        result["keys"][key] = per_key
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_result(name, result)
    if masks_mean is not None:
        result["index"] = index_figures(editor, masks_mean, prompt_sets["nq"])
        log(f"index of {args.edits} real masks: {result['index']}")
        write_result(name, result)
    print(f"wrote benchmarks/results/{name}.json", file=sys.stderr)


def index_figures(editor: Editor, src_masks: torch.Tensor, prompts: list[str], repeats: int = 20) -> dict[str, Any]:
    """The memory's own index filled with the stream's masks (MEMOIR's key), as a worker holds it
    after these edits: bytes per mask (deep_bytes, and the index's own count of its mask storage)
    and the prefill decision's time per prompt (`ResidualMemory.decide`), batches of 1 and 16."""
    from benchmarks.bench_stream import deep_bytes

    memory = editor.memory
    columns = src_masks.nonzero()[:, 1].view(src_masks.shape[0], -1)
    for i, cols in enumerate(columns):
        memory.index.add(i, cols)
    out: dict[str, Any] = {"distinct_masks": len(memory.index), **deep_bytes(memory.index)}
    out["bytes_per_mask"] = round(out["bytes"] / max(1, len(memory.index)), 1)
    if hasattr(memory.index, "nbytes"):
        out["mask_storage_bytes"] = int(memory.index.nbytes)
    for size in (1, 16):
        batch = editor.batch(prompts[:size])
        acts = layer_input(editor, batch)
        memory.decide(acts, batch.prompt_mask)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            memory.decide(acts, batch.prompt_mask)
            times.append((time.perf_counter() - started) * 1e3 / size)
        out[f"decide_ms_per_prompt_batch_{size}"] = {"median": round(statistics.median(times), 4),
                                                     "min": round(min(times), 4)}
    return out


if __name__ == "__main__":
    main()
