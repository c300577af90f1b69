"""`memoir eval`: sequential zsRE evaluation of MEMOIR on a model (Rel, Gen, Loc after T edits)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli import EXIT_INVALID, emit_json, fail
from pipeline.runtime_options import device_option, dtype_option, n_iter_option, threshold_option
from pipeline.model_options import model_option, module_path_option

CURVE_POINTS = 20  # scores taken along the way when --plot asks for the curve

log = logging.getLogger(__name__)


def plot_curve(curve: list[dict[str, Any]], path: str, title: str) -> None:
    """Rel, Gen and Loc against the number of edits, teacher-forced (solid) and from generated
    answers (dashed, same colour), as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [p["edits"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, colour in (("rel", "Rel", "C0"), ("gen", "Gen", "C1"), ("loc", "Loc", "C2")):
        ax.plot(edits, [p[key] for p in curve], marker="o", markersize=3, color=colour, label=f"{label} (teacher-forced)")
        ax.plot(edits, [p[f"{key}_gen"] for p in curve], marker="x", markersize=3, color=colour, linestyle="--",
                label=f"{label} (generated)")
    ax.set_xlabel("number of sequential edits (T)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("eval")
@model_option()
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="zsRE records, JSON Lines (the format of memoir/data/zsre_dev.jsonl).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Edit the first N valid records (default: all).")
@click.option("--layer", type=click.IntRange(min=0), default=None, help="Edited layer (default ≈ 0.84 of the depth).")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=None, help="Mask size k (default ≈ 0.286 D).")
@threshold_option()
@n_iter_option()
@click.option("--seed", type=int, default=None, help="Seed of the permutation π (default 0).")
@click.option("--distinct-subjects", is_flag=True,
              help="Edit only the first record of each subject (zsRE repeats subjects with other targets).")
@module_path_option
@device_option()
@dtype_option()
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (last line of stdout).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write Rel/Gen/Loc against the number of edits to this PNG.")
def eval_command(model_name: str, data_path: str, limit: int | None, layer: int | None, top_k: int | None,
                 threshold: float | None, n_iter: int | None, seed: int | None, distinct_subjects: bool,
                 module_path: str | None, device: str, dtype: str | None, as_json: bool, plot_path: str | None) -> None:
    """Edit the first N valid zsRE records one after another, then score all of them."""
    from tqdm import tqdm

    from memoir.config import ConfigError, MemoirConfig
    from memoir.evaluate import evaluate, read_records
    from memoir.locate import UnknownArchitectureError
    from memoir.sources import load_model, resolve_model, torch_dtype

    try:
        config = MemoirConfig().replace(layer=layer, top_k=top_k, threshold=threshold, seed=seed,
                                        module_path=module_path, n_iter=n_iter)
    except ConfigError as exc:
        fail(str(exc), EXIT_INVALID)
    try:
        records = read_records(data_path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {data_path}: {exc}", EXIT_INVALID)
    model, tokenizer, _ = load_model(model_name, device=device, dtype=torch_dtype(dtype))

    bar = tqdm(total=limit, desc="editing", unit="edit", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    every = max(1, math.ceil((limit or len(records)) / CURVE_POINTS)) if plot_path else None
    try:
        result = evaluate(model, tokenizer, records, limit=limit, config=config, every=every, progress=progress,
                          distinct_subjects=distinct_subjects)
    except (ConfigError, UnknownArchitectureError, ValueError) as exc:
        bar.close()
        fail(str(exc), EXIT_INVALID)
    bar.close()
    result["model"] = model_name
    result["data"] = str(Path(data_path))
    if plot_path:
        plot_curve(result["curve"], plot_path, f"MEMOIR on zsRE: {Path(resolve_model(model_name)[0]).name}")
        result["plot"] = plot_path
    if as_json:
        emit_json(result)
    else:
        click.echo(f"edits {result['edits']} (skipped {result['skipped']} invalid records, refused {result['refused']})")
        click.echo(f"teacher-forced  rel {result['rel']:.4f}  gen {result['gen']:.4f}  loc {result['loc']:.4f}  "
                   f"avg {result['avg']:.4f}")
        click.echo(f"generated       rel {result['rel_gen']:.4f}  gen {result['gen_gen']:.4f}  "
                   f"loc {result['loc_gen']:.4f}  avg {result['avg_gen']:.4f}")
        click.echo(f"threshold {result['config']['threshold']:g}")
        click.echo(f"seconds per edit {result['seconds_per_edit']:.3f}")
        if plot_path:
            click.echo(f"plot written to {plot_path}")
