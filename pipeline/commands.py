"""`memoir submit` and `memoir status`: the producer's commands (no torch)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from pipeline.cli import EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE, emit_json, fail
from pipeline.client import BrokerError, Client, UnknownRequestError, WaitTimeout
from pipeline.schema import EditRequest, RequestError, check_unique_ids, read_edit_file, validate_edit


def _replaces(text: str | None) -> int | str | None:
    """--replaces: digits are a ledger edit id, other text a request id or "same-prompt"."""
    return int(text) if text is not None and text.isascii() and text.isdigit() else text


def _requests(prompt: str | None, target: str | None, rephrases: tuple[str, ...], request_id: str | None,
              name: str | None, path: str | None, replaces: str | None = None) -> list[EditRequest]:
    """Every request of the command line, validated before anything is sent."""
    if path is not None:
        if prompt is not None or target is not None or rephrases or request_id is not None or replaces is not None:
            raise click.UsageError("--file cannot be combined with --prompt, --target, --rephrase, --id or "
                                   "--replaces (a line may carry its own \"replaces\")")
        requests = list(read_edit_file(path, name=name))
        if not requests:
            raise RequestError("file", f"{path} holds no edits")
        check_unique_ids(requests)
        return requests
    if prompt is None or target is None:
        raise click.UsageError("give --prompt and --target, or --file")
    return [validate_edit({"prompt": prompt, "target": target, "rephrases": list(rephrases),
                           "request_id": request_id, "name": name, "replaces": _replaces(replaces)})]


DEFAULT_WAIT_TIMEOUT = 600.0


def unserved(client: Client, names: list[str]) -> list[str]:
    """The memories among `names` that no live worker announces in Redis (`memoir:worker:<name>`)."""
    return [n for n in dict.fromkeys(names) if client.worker(n) is None]


def warn_unserved(names: list[str]) -> None:
    for name in names:
        click.echo(f"warning: no worker serves memory {name!r} (no live memoir:worker:{name} in Redis): "
                   f"the requests wait on queue memoir.{name} until `memoir worker --name {name}` runs", err=True)


def _line(record: dict[str, Any]) -> str:
    """One status record as a readable line."""
    text = f"{record['request_id']}  {record.get('status', '?')}"
    if record.get("edit_id") is not None:
        text += f"  edit {record['edit_id']} (seq {record.get('seq')})"
    scores = record.get("scores") or {}
    if scores:
        text += "  " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items())
    if record.get("superseded"):
        text += "  superseded: " + ", ".join(f"edit {s['rolled_back']}" for s in record["superseded"])
    if record.get("reason"):
        text += f"  reason: {record['reason']}"
    return text


@click.command()
@click.option("--prompt", help="The prompt to edit.")
@click.option("--target", help="The answer the edited model should give.")
@click.option("--rephrase", "rephrases", multiple=True, help="A rephrasing of the prompt (repeatable).")
@click.option("--id", "request_id", help="Request id (the idempotency key); generated when absent.")
@click.option("--name", default=None, help="Target memory (queue memoir.<name>); default 'default'.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False),
              help="JSONL of zsRE records or {prompt, target, ...} lines (each may carry \"replaces\").")
@click.option("--replaces", metavar="ID|same-prompt", default=None,
              help="Supersede an edit (its ledger id or request id, or 'same-prompt': the live edit with this "
                   "prompt): the worker rolls it back in the same queued operation; refused if it is not live.")
@click.option("--wait", is_flag=True, help="Wait until every edit is applied or failed.")
@click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_WAIT_TIMEOUT, show_default=True,
              help="With --wait: give up after this many seconds (exit status 3; 0: wait for ever).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def submit(prompt: str | None, target: str | None, rephrases: tuple[str, ...], request_id: str | None,
           name: str | None, path: str | None, replaces: str | None, wait: bool, timeout: float | None,
           as_json: bool) -> None:
    """Submit edits to a memory's queue. Everything is validated before anything is sent; the
    exit status is non-zero when anything is refused (or, with --wait, failed)."""
    from tqdm import tqdm

    try:
        requests = _requests(prompt, target, rephrases, request_id, name, path, replaces)
    except RequestError as exc:
        fail(f"refused, nothing was sent: {exc}", EXIT_INVALID)
    client = Client()
    show_bar = path is not None
    try:
        client.check_conflicts(requests)
        handles = [client.submit_request(r)
                   for r in tqdm(requests, desc="submit", unit="edit", disable=not show_bar)]
        idle = unserved(client, [h.name for h in handles])
    except RequestError as exc:
        fail(f"refused: {exc}", EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    warn_unserved(idle)
    ids = [h.request_id for h in handles]
    duplicates = [h.request_id for h in handles if h.duplicate]
    if not wait:
        for handle in handles:
            if not as_json:
                note = " (already submitted: not sent again)" if handle.duplicate else ""
                click.echo(f"submitted {handle.request_id} to memoir.{handle.name}{note}")
        if as_json:
            emit_json({"submitted": len(ids), "ids": ids, "duplicates": duplicates, "no_worker": idle})
        return

    try:
        with tqdm(total=len(ids), desc="wait", unit="edit", disable=not show_bar) as bar:
            records = client.wait(ids, timeout=timeout or None, on_done=lambda _r: bar.update())
    except WaitTimeout as exc:
        records = exc.statuses
        counts = Counter(r.get("status") for r in records.values())
        if as_json:
            emit_json({"submitted": len(ids), "applied": counts["applied"], "failed": counts["failed"],
                       "ids": ids, "timed_out": True, "no_worker": idle})
        still = unserved(client, [h.name for h in handles]) if idle else []
        why = (f"; no worker serves memory {', '.join(map(repr, still))}: start `memoir worker --name NAME`"
               if still else "")
        fail(f"timed out: {exc}{why} (the requests stay queued; `memoir status ID` follows them)", EXIT_UNAVAILABLE)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    counts = Counter(r.get("status") for r in records.values())
    if as_json:
        emit_json({"submitted": len(ids), "applied": counts["applied"], "failed": counts["failed"], "ids": ids,
                   "timed_out": False, "no_worker": idle})
    else:
        for request_id in ids:
            click.echo(_line(records[request_id]))
        click.echo(f"{len(ids)} submitted, {counts['applied']} applied, {counts['failed']} failed")
    if counts["failed"]:
        fail(f"{counts['failed']} of {len(ids)} edits failed (see `memoir status ID`)", EXIT_FAILED)


@click.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status record as JSON.")
def status(request_id: str, as_json: bool) -> None:
    """What became of a submitted request: its status, edit id, sequence number, scores or reason."""
    try:
        record = Client().status(request_id)
    except UnknownRequestError as exc:
        fail(str(exc), EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if as_json:
        emit_json(record)
        return
    for key in ("request_id", "name", "kind", "status", "edit_id", "seq", "scores", "reason",
                "loss", "steps", "seconds", "updated_at"):
        if record.get(key) is not None:
            click.echo(f"{key:>10}: {record[key]}")
