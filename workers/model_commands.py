"""`memoir apply` (offline bulk import of edits straight into the store) and `memoir generate`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from pipeline.cli import EXIT_FAILED, EXIT_INVALID, emit_json, fail
from pipeline.runtime_options import device_option, dtype_option, n_iter_option, threshold_option
from pipeline.schema import EditRequest, scan_edit_file
from pipeline.store_commands import checkpoint_every_option, keep_checkpoints_option
from pipeline.model_options import prompt_format_option
from pipeline.model_options import model_option, module_path_option

log = logging.getLogger(__name__)

STORE_HELP = "store directory or database URL (default: $MEMOIR_STORE, else ./memoir-store)"


def read_requests(path: Path, name: str = "default") -> tuple[list[dict[str, Any]], list[str]]:
    """(requests, problems) of an edit file, read by the producer's reader
    (`pipeline.schema.scan_edit_file`: the same mapping and checks as `memoir submit --file`):
    each line that is not a valid request is reported ("line N: field: why"), not fatal. A line
    without an id gets one from its content (`apply-<sha256>`), so applying a file twice applies
    each edit once; a line naming another memory than `name` is a problem."""
    requests, problems = [], []
    for line in scan_edit_file(path, name=name, default_id=lambda r: _request_id(name, r)):
        if line.error is not None:
            problems.append(str(line.error))
        elif line.request.name != name:
            problems.append(f"line {line.number}: name: is {line.request.name!r}; this command applies memory {name!r}")
        else:
            requests.append(line.request.to_message())
    return requests, problems


def _request_id(name: str, request: EditRequest) -> str:
    """A line without an id gets one from its content: applying the same file again skips it."""
    from store.records import payload_hash

    digest = payload_hash(name, request.prompt, request.target, list(request.rephrases), request.metadata)
    return f"apply-{digest[:32]}"


def model_options(f):
    for option in reversed([
        model_option("model"),
        click.option("--store", "store_path", default=None, help=STORE_HELP),
        click.option("--name", default="default", show_default=True, help="memory name"),
        device_option(),
        dtype_option(),
    ]):
        f = option(f)
    return f


def _open_runtime(**kwargs: Any):
    from memoir import ConfigError, MemoryMismatchError, UnknownArchitectureError
    from store import StoreError
    from workers.runtime import Runtime

    try:
        return Runtime.open(**kwargs)
    except (MemoryMismatchError, ConfigError, StoreError, OSError, ValueError, UnknownArchitectureError) as exc:
        fail(str(exc), EXIT_INVALID)


@click.command("apply")
@model_options
@click.option("--file", "file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL of zsRE records or {prompt, target, rephrases, id, metadata, replaces} objects")
@click.option("--layer", type=int, default=None, help="edited layer (a new memory only)")
@click.option("--top-k", "top_k", type=int, default=None, help="columns per edit (a new memory only)")
@threshold_option()
@n_iter_option()
@module_path_option
@prompt_format_option
@keep_checkpoints_option
@checkpoint_every_option
@click.option("--json", "as_json", is_flag=True,
              help='last line: {"applied", "failed", "skipped", "ids", "superseded", ...}')
def apply(model: str, store_path: str | None, name: str, device: str, dtype: str | None, file: Path,
          layer: int | None, top_k: int | None, threshold: float | None, n_iter: int | None,
          module_path: str | None, keep_checkpoints: int, checkpoint_every: int | None, as_json: bool,
          prompt_format: str | None = None) -> None:
    """Apply the edits of FILE in-process, straight into the store (no Redis): offline bulk import.

    Lines without an id get one from their content, so applying a file twice applies each
    edit once; lines that are not valid requests are reported and skipped (exit status 2 when
    nothing else went wrong); a failed edit makes it 1. `ids` are the ledger
    ids of the file's edits (applied, failed or already there). A line with `replaces` rolls
    the edit it names back once it is applied (`superseded`: the ids rolled back); one naming
    no live edit fails and changes nothing."""
    from tqdm import tqdm

    from workers.supersede import apply_superseding

    requests, problems = read_requests(file, name)
    for problem in problems:
        click.echo(f"skipped {problem}", err=True)
    config = None
    if n_iter is not None:
        from memoir import MemoirConfig

        config = MemoirConfig(n_iter=n_iter)
    runtime = _open_runtime(model=model, store=store_path, name=name, layer=layer, top_k=top_k, device=device,
                            dtype=dtype, threshold=threshold, config=config, module_path=module_path,
                            keep_checkpoints=keep_checkpoints, checkpoint_every=checkpoint_every,
                            prompt_format=prompt_format)
    counts = {"applied": 0, "failed": 0, "skipped": len(problems)}
    ids: list[int] = []
    superseded: list[int] = []
    started = time.perf_counter()
    processed = 0
    try:
        for outcome in runtime.resume():
            click.echo(f"resumed edit {outcome['edit_id']}: {outcome['status']}", err=True)
        for request in tqdm(requests, desc="edits", unit="edit", disable=None):
            outcome = apply_superseding(runtime, request)
            if outcome["edit_id"] is not None:
                ids.append(outcome["edit_id"])
            for summary in outcome.get("superseded") or []:
                superseded.append(summary["rolled_back"])
                click.echo(f"edit {outcome['edit_id']} superseded edit {summary['rolled_back']} "
                           f"({len(summary['checked'])} checked, {len(summary['replayed'])} replayed)", err=True)
            if outcome["duplicate"]:
                counts["skipped"] += 1
                continue
            processed += 1
            if outcome["status"] == "applied":
                counts["applied"] += 1
            else:
                counts["failed"] += 1
                edit = f"edit {outcome['edit_id']}" if outcome["edit_id"] is not None else "request"
                click.echo(f"{edit} ({outcome['request_id']}) failed: {outcome['reason']}", err=True)
    finally:
        runtime.close()
    seconds = time.perf_counter() - started
    summary = {**counts, "ids": ids, "superseded": superseded, "invalid": len(problems),
               "seconds_per_edit": round(seconds / processed, 4) if processed else None}
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"applied {counts['applied']}, failed {counts['failed']}, skipped {counts['skipped']} "
                   f"(memory {name!r} in {runtime.store.location})")
    if counts["failed"]:
        sys.exit(EXIT_FAILED)  # the other edits are in; the exit status says that not all of the file was
    if problems:
        sys.exit(EXIT_INVALID)  # invalid lines skipped: the valid edits are in


@click.command("generate")
@model_options
@click.option("--no-memory", is_flag=True, help="answer with the base model (memory off)")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help='last line: {"outputs": [...]}')
@click.argument("prompts", nargs=-1, required=True)
def generate(model: str, store_path: str | None, name: str, device: str, dtype: str | None, no_memory: bool,
             max_new_tokens: int, as_json: bool, prompts: tuple[str, ...]) -> None:
    """Answer PROMPTS (batched, greedy) with the model edited by the memory rebuilt from the store."""
    if max_new_tokens < 1:
        fail("--max-new-tokens must be >= 1", EXIT_INVALID)
    runtime = _open_runtime(model=model, store=store_path, name=name, device=device, dtype=dtype, readonly=True)
    try:
        if not runtime.persistent and not no_memory:
            click.echo(f"note: no memory {name!r} in {runtime.store.location}: answering with the base model", err=True)
        outputs = runtime.generate(list(prompts), max_new_tokens=max_new_tokens, use_memory=not no_memory)
    finally:
        runtime.close()
    if as_json:
        emit_json({"outputs": outputs})
    else:
        for prompt, output in zip(prompts, outputs):
            click.echo(f"{prompt} → {output}")
