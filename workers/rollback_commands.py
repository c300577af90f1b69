"""`memoir rollback` and `memoir replay` (the logic is in workers/rollback.py and workers/replay.py).

A rollback goes through the memory's queue when a worker serves it (the worker holds the
store's writer lock), so that it is ordered with the edits; on a store that no worker holds it
runs in this process, loading the model the memory was made on (or `--model`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from pipeline.cli import EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE, emit_json, fail
from pipeline.ledger_commands import STORE_HELP, open_store
from pipeline.runtime_options import DEVICE_HELP, device_option, dtype_option
from pipeline.model_options import MODEL_HELP, model_option

log = logging.getLogger(__name__)


def served_by_worker(store, name: str) -> bool:
    """True when another process (a worker) holds the memory's writer lock."""
    from store import WriterLockedError

    try:
        lock = store.writer_lock(name)
    except WriterLockedError:
        return True
    lock.release()
    return False


def _open_runtime(store_path: str | None, name: str, model: str | None, device: str, readonly: bool = False,
                  dtype: str | None = None):
    from memoir import ConfigError, MemoryMismatchError
    from store import StoreError, WriterLockedError
    from workers.runtime import Runtime

    try:
        if model is None:
            with open_store(store_path) as store:
                model = store.get_memory(name).model_id
        return Runtime.open(model, store=store_path, name=name, device=device, dtype=dtype, readonly=readonly)
    except WriterLockedError as exc:
        fail(f"a worker took memory {name!r} meanwhile ({exc}); run the command again to queue the rollback")
    except (MemoryMismatchError, ConfigError, StoreError, OSError, ValueError) as exc:
        fail(str(exc), EXIT_INVALID)


def rollback_json(ids: list[int], single: bool, summaries: list[dict[str, Any]] | None, via: str,
                  request_ids: list[str] | None = None) -> dict[str, Any]:
    """`rollback --json`, one shape whatever the path (in-process, through the worker's queue,
    waited for or not): `rolled_back` (the edit id when an EDIT was given, else the list),
    `edits` (always the list), `checked`/`replayed` (sorted ids; null while queued), `seconds`
    (summed; null while queued), `status` ("done" or "queued"), `via` ("in-process" or
    "worker"), `request_ids` (the queued rollbacks' ids; [] in-process)."""
    done = summaries is not None
    checked = sorted({i for s in summaries for i in s.get("checked") or []}) if done else None
    replayed = sorted({i for s in summaries for i in s.get("replayed") or []}) if done else None
    seconds = round(sum(s.get("seconds") or 0.0 for s in summaries), 4) if done else None
    return {"rolled_back": ids[0] if single else list(ids), "edits": list(ids), "checked": checked,
            "replayed": replayed, "seconds": seconds, "status": "done" if done else "queued", "via": via,
            "request_ids": list(request_ids or [])}


def _describe(summary: dict[str, Any]) -> str:
    replayed = summary["replayed"] or []
    listed = f" {replayed}" if replayed else ""
    return (f"rolled back edit {summary['rolled_back']}: {len(summary['checked'] or [])} overlapping edits checked, "
            f"{len(replayed)} replayed{listed} ({summary['seconds']:.2f} s)")


@click.command("rollback")
@click.argument("edit", required=False)
@click.option("--prompt", default=None, help="retract the live edits with this prompt (case and spacing ignored)")
@click.option("--subject", default=None, help="retract the live edits whose metadata subject is this")
@click.option("--reason", default=None, help="why (recorded in the ledger)")
@click.option("--exact", is_flag=True, help="rebuild as if the edit had never been applied (re-trains later edits)")
@click.option("--wait", is_flag=True, help="when a worker serves the memory: wait for the outcome")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="with --wait: give up after this many seconds (exit status 3; 0: wait for ever)")
@click.option("--yes", "-y", is_flag=True, help="do not ask before retracting edits matched by --prompt/--subject")
@click.option("--json", "as_json", is_flag=True,
              help='last line: {"rolled_back", "edits", "checked", "replayed", "seconds", "status", "via", '
                   '"request_ids"}, the same whatever the path')
@click.option("--store", "store_path", default=None, help=STORE_HELP)
@click.option("--name", default="default", show_default=True, help="memory name")
@model_option("model", required=False, help=f"in-process: {MODEL_HELP} (default: the memory's model)")
@device_option(help=f"in-process: {DEVICE_HELP}")
@dtype_option(help="in-process: the model weights' dtype (W_m stays float32)")
def rollback(edit: str | None, prompt: str | None, subject: str | None, reason: str | None, exact: bool,
             wait: bool, timeout: float | None, yes: bool, as_json: bool, store_path: str | None, name: str,
             model: str | None, device: str, dtype: str | None) -> None:
    """Take edit EDIT (ledger id or request id) out of the memory, or the live edits matching
    --prompt/--subject. The edits sharing its columns are checked, and those it made worse are
    replayed. Unknown, failed or already rolled-back edits are refused and nothing changes."""
    from store import StoreError
    from workers.rollback import RollbackError, live_edit, matching_edits

    if sum(x is not None for x in (edit, prompt, subject)) != 1:
        raise click.UsageError("give one of: an edit ID, --prompt TEXT or --subject TEXT")
    with open_store(store_path) as store:
        try:
            if edit is not None:
                targets = [live_edit(store, name, edit)]
            else:
                targets = matching_edits(store, name, prompt, subject)
            served = served_by_worker(store, name)
        except (RollbackError, StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    if not targets:
        fail(f"no live edit of memory {name!r} has that {'prompt' if prompt is not None else 'subject'}",
             EXIT_INVALID)
    if edit is None:
        click.echo(f"{len(targets)} live edit(s) match:", err=True)
        for e in targets:
            click.echo(f"  edit {e.id} (seq {e.seq}): {e.prompt} → {e.target}", err=True)
        if not (yes or as_json) and not click.confirm("roll them back?", err=True):
            fail("nothing was rolled back")
    reason = reason or ("retracted" if edit is None else None)
    ids = [e.id for e in targets]
    if served:
        summaries, request_ids = _through_queue(ids, reason, exact, name, wait, timeout, as_json)
    else:
        summaries, request_ids = _in_process(ids, reason, exact, store_path, name, model, device, dtype, as_json), []
    if as_json:
        emit_json(rollback_json(ids, edit is not None, summaries, "worker" if served else "in-process", request_ids))
    elif summaries is not None:
        for summary in summaries:
            click.echo(_describe(summary))


def _in_process(ids: list[int], reason: str | None, exact: bool, store_path: str | None, name: str,
                model: str | None, device: str, dtype: str | None, as_json: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from store import StoreError
    from workers.rollback import RollbackError, continue_rollback, start_rollback

    runtime = _open_runtime(store_path, name, model, device, dtype=dtype)
    summaries = []
    try:
        for edit_id in ids:
            report = start_rollback(runtime, edit_id, reason, exact, budget=1.0)
            with tqdm(total=len(report.replayed) + len(report.failed) + report.remaining, desc=f"edit {edit_id} replays",
                      unit="edit", disable=None if not as_json else True, file=sys.stderr) as bar:
                bar.update(len(report.replayed) + len(report.failed))
                while not report.done:
                    report = continue_rollback(runtime, report.job, report.rolled_back, budget=1.0)
                    bar.n = len(report.replayed) + len(report.failed)
                    bar.refresh()
            for edit, error in report.failed.items():
                click.echo(f"warning: the replay of edit {edit} failed (it keeps its contribution): {error}", err=True)
            summaries.append(report.summary())
    except (RollbackError, StoreError) as exc:
        fail(str(exc))
    finally:
        runtime.close()
    return summaries


def _through_queue(ids: list[int], reason: str | None, exact: bool, name: str, wait: bool,
                   timeout: float | None, as_json: bool) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(summaries, request ids): summaries None when the rollbacks were only queued."""
    from pipeline.client import BrokerError, Client, RequestError, WaitTimeout

    client = Client()
    try:
        handles = [client.rollback(edit_id, reason=reason, exact=exact, name=name) for edit_id in ids]
    except RequestError as exc:
        fail(str(exc), EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    request_ids = [h.request_id for h in handles]
    if not wait:
        for handle in handles:
            click.echo(f"a worker serves memory {name!r}: rollback queued as {handle.request_id} "
                       f"(`memoir status {handle.request_id}`)", err=as_json)
        return None, request_ids
    try:
        records = client.wait(request_ids, timeout=timeout or None)
    except WaitTimeout as exc:
        fail(f"timed out: {exc} (the rollbacks stay queued: `memoir status ID`)", EXIT_UNAVAILABLE)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    failed = [r for r in records.values() if r.get("status") != "done"]
    if failed:
        fail("; ".join(f"rollback {r['request_id']} failed: {r.get('reason')}" for r in failed), EXIT_FAILED)
    return [{k: records[h.request_id].get(k) for k in ("rolled_back", "checked", "replayed", "seconds")}
            for h in handles], request_ids


@click.command("replay")
@click.option("--from", "from_seq", type=int, default=1, show_default=True,
              help="rebuild the live edits from this sequence number on (earlier ones from their deltas)")
@click.option("--name", default="default", show_default=True, help="memory name")
@click.option("--mode", type=click.Choice(["retrain", "sum"]), default="retrain", show_default=True,
              help="retrain: re-optimise each edit from its record (same mask, same unrelated sample); "
                   "sum: add the recorded deltas")
@click.option("--json", "as_json", is_flag=True, help="last line: the replay report as one JSON object")
@click.option("--store", "store_path", default=None, help=STORE_HELP)
@model_option("model", required=False, help=f"retrain: {MODEL_HELP} (default: the memory's model)")
@device_option(help=f"retrain: {DEVICE_HELP}")
@dtype_option(help="retrain: the model weights' dtype (W_m stays float32)")
def replay(from_seq: int, name: str, mode: str, as_json: bool, store_path: str | None, model: str | None,
           device: str, dtype: str | None) -> None:
    """Rebuild W_m and the index from the ledger and verify them against the stored memory.

    Changes no memory (it may run beside a worker). Exit status 1 when they differ: after
    rollbacks or replays a retrain gives the memory as if the rolled-back edits had never been
    applied, which differs from the stored one by design; `--mode sum` then checks the store."""
    from store import StoreError
    from workers.rollback import RollbackError
    from workers.replay import replay as run_replay

    runtime = _open_runtime(store_path, name, model, device, readonly=True, dtype=dtype) if mode == "retrain" else None
    store = runtime.store if runtime is not None else open_store(store_path)
    try:
        if runtime is not None and not runtime.persistent:
            fail(f"no memory {name!r} in {store.location}", EXIT_INVALID)
        report, _ = run_replay(store, name, from_seq, mode, runtime.editor if runtime else None)
    except (RollbackError, StoreError, KeyError) as exc:
        fail(str(exc), EXIT_INVALID)
    finally:
        (runtime or store).close()
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"replayed memory {name!r} ({mode}) from seq {from_seq}: {len(report.rebuilt)} of {report.edits} "
                   f"live edits rebuilt in {report.seconds:.2f} s; W_m max |diff| vs stored {report.max_abs_diff:.3g}"
                   f"{' (identical)' if report.identical else ''}; sha256 {report.sha256[:16]}")
        if report.diverged:
            click.echo(f"{len(report.diverged)} edits re-trained to another delta than recorded: {report.diverged}")
        if report.mask_mismatches:
            click.echo(f"edits whose prompt selects another mask than recorded: {report.mask_mismatches}")
    if not report.ok:
        if as_json:
            sys.exit(1)
        fail("the rebuilt memory differs from the stored one" +
             (" (its history has rollbacks or replays: try --mode sum)" if report.diverged else ""))
