"""`memoir ledger list|show|verify|diff`: read-only views of the edit store. They never import torch."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from pipeline.cli import EXIT_INVALID, EXIT_UNAVAILABLE, emit_json, fail

STORE_HELP = "store directory or database URL (default: $MEMOIR_STORE, else ./memoir-store)"

def missing_store(store_path: str | None) -> str | None:
    """Why there is no store at `store_path` (`$MEMOIR_STORE`, else ./memoir-store), or None when
    there is one: a directory without its ledger file, an SQLite URL whose file does not exist, a
    database without the ledger's tables. Read-only commands refuse such a store rather than
    create an empty one."""
    import os
    import re
    from pathlib import Path

    from store.store import DEFAULT_STORE, LEDGER_FILE

    target = str(store_path or os.environ.get("MEMOIR_STORE") or DEFAULT_STORE)
    hint = "give --store (or MEMOIR_STORE) the store a worker or `memoir apply` writes"
    if "://" not in target:
        if not (Path(target) / LEDGER_FILE).is_file():
            return f"no store at {target} (no {LEDGER_FILE} there): {hint}"
        return None
    from store import database

    db = database.connect_url(target)
    shown = re.sub(r"//[^@/]*@", "//***@", target)  # never show a password
    try:
        if target.startswith("sqlite"):
            path = Path(db.database)
            if str(path) != ":memory:" and not path.is_file():
                return f"no store at {shown} (the file {path} does not exist): {hint}"
        tables = set(db.get_tables())
    finally:
        db.close()
    if "store_info" not in tables:
        return f"no store at {shown} (the database has no ledger tables): {hint}"
    return None


def open_store(store_path: str | None, *, create: bool = False):
    """The store, or `error: ...` and exit 2 when there is none (unless `create`), or exit 3
    when its database does not answer (after the store's bounded retries)."""
    from peewee import DatabaseError, InterfaceError, OperationalError

    from store import Store, StoreError

    try:
        if not create:
            missing = missing_store(store_path)
            if missing:
                fail(missing, EXIT_INVALID)
        return Store.open(store_path)
    except (OperationalError, InterfaceError) as exc:
        fail(f"cannot open the store: {str(exc).strip()}", EXIT_UNAVAILABLE)
    except (StoreError, OSError, DatabaseError) as exc:
        fail(f"cannot open the store: {str(exc).strip()}", EXIT_INVALID)


def store_options(f: Callable) -> Callable:
    f = click.option("--name", default=None, help="memory name (default: every memory)")(f)
    return click.option("--store", "store_path", default=None, help=STORE_HELP)(f)


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


@click.group("ledger")
def ledger() -> None:
    """Inspect and check the edit ledger (read-only)."""


@ledger.command("list")
@store_options
@click.option("--status", default=None, help="queued, applying, applied, failed or rolled_back")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the newest N edits")
@click.option("--json", "as_json", is_flag=True, help="a JSON array of edits")
def list_edits(store_path: str | None, name: str | None, status: str | None, limit: int | None,
               as_json: bool) -> None:
    """Edits in sequence order: id, seq, memory, status, time, prompt → target."""
    from store import StoreError

    with open_store(store_path) as store:
        try:
            edits = store.edits(name, status=status, limit=limit)
        except (StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    if as_json:
        emit_json([e.to_dict(with_mask=False) for e in edits])
        return
    if not edits:
        click.echo("no edits")
        return
    from pipeline.tables import echo_table

    echo_table(["id", "seq", "memory", "status", "created (UTC)", "prompt → target"],
               ([e.id, e.seq, e.memory, e.status, e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                 f"{_short(e.prompt, 60)} → {_short(e.target, 30)}"] for e in edits),
               widths={"memory": 16, "prompt → target": 100}, right=["id", "seq"])


@ledger.command("memories")
@store_options
@click.option("--json", "as_json", is_flag=True, help="a JSON array of memories")
def memories(store_path: str | None, name: str | None, as_json: bool) -> None:
    """Each memory: its model, layer, mask size, retrieval threshold (and how it was fitted), live edits."""
    with open_store(store_path) as store:
        found = [m for m in store.memories() if name is None or m.name == name]
        live = {m.name: len(store.applied(m.name)) for m in found}
    if name is not None and not found:
        fail(f"no memory named {name!r} in this store", EXIT_INVALID)
    rows = [{"name": m.name, "model": m.model_id, "revision": m.revision, "layer": m.layer, "top_k": m.top_k,
             "intermediate_size": m.intermediate_size, "threshold": m.config.get("threshold"),
             "threshold_fit": m.config.get("threshold_fit"), "live_edits": live[m.name], "version": m.version,
             "created_at": m.to_dict()["created_at"]} for m in found]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no memories")
    for row in rows:
        fit = row["threshold_fit"]
        how = (f"fitted: chance overlap {fit['chance_mean']:.3f} ± {fit['chance_sd']:.3f} over {fit['pairs']} pairs, "
               f"for {fit['capacity']} stored masks" if fit else "given")
        click.echo(f"{row['name']}: {row['model']}, layer {row['layer']}, k {row['top_k']} of "
                   f"{row['intermediate_size']}, threshold {row['threshold']} ({how}), {row['live_edits']} live edits")


@ledger.command("show")
@click.option("--store", "store_path", default=None, help=STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="the edit as one JSON object")
@click.argument("edit_id", type=int)
def show(store_path: str | None, as_json: bool, edit_id: int) -> None:
    """One edit in full: request, status, mask, loss, timing, scores, delta and events."""
    from store import StoreError

    with open_store(store_path) as store:
        try:
            edit = store.edit(edit_id)
            events = store.events(edit)
        except (StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    data = edit.to_dict()
    data["events"] = [ev.to_dict() for ev in events]
    if as_json:
        emit_json(data)
        return
    for key in ("id", "memory", "seq", "request_id", "status", "reason", "prompt", "target", "rephrases",
                "metadata", "created_at", "applied_at", "rolled_back_at", "loss", "steps", "seconds", "scores",
                "unrelated", "delta_file", "delta_sha256", "delta_format", "delta_bytes", "replaces"):
        if data.get(key) not in (None, [], {}):
            click.echo(f"{key:>15}: {_value(data[key])}")
    mask = data["mask"]
    if mask is not None:
        head = ", ".join(map(str, mask[:12]))
        click.echo(f"{'mask':>15}: {len(mask)} columns [{head}{', …' if len(mask) > 12 else ''}]")
    click.echo(f"{'events':>15}:")
    for ev in data["events"]:
        click.echo(f"{'':>17}{ev['time']}  {ev['kind']:<11} by {ev['actor']}  {_value(ev['detail'])}")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items())
    return str(value)


@ledger.command("verify")
@store_options
@click.option("--json", "as_json", is_flag=True, help='{"ok", "errors", "warnings", "checked"}')
def verify(store_path: str | None, name: str | None, as_json: bool) -> None:
    """Check hashes, W_m = Σ applied deltas, masks vs index, statuses; exit non-zero on a problem."""
    from store import StoreError

    with open_store(store_path) as store:
        try:
            report = store.verify(name)
        except (StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    if as_json:
        emit_json(report.to_dict())
    else:
        for warning in report.warnings:
            click.echo(f"warning: {warning}", err=True)
        for error in report.errors:
            click.echo(f"ERROR: {error}")
        c = report.checked
        click.echo(f"checked {c['memories']} memories, {c['edits']} edits ({c['applied']} applied), "
                   f"{c['delta_files']} delta files, {c['checkpoints']} checkpoints; "
                   f"max |W_m - Σ deltas| {c['max_abs_diff']:.3g}")
    if not report.ok:
        if as_json:
            sys.exit(1)
        fail(f"the ledger has {len(report.errors)} problem(s)")
    if not as_json:
        click.echo("ok")


def _diff(store: Any, name: str, start: int, end: int) -> dict[str, Any]:
    """What changed in memory `name` between seq `start` and seq `end`, from the event log.

    The memory "at seq S" is as it stood before the edit with seq S+1 was recorded (as in
    store.snapshots): rollbacks and replays committed between S and S+1 belong to S."""
    edits = {e.id: e for e in store.edits(name)}
    by_seq = {e.seq: e.id for e in edits.values()}
    events = store.events(name=name)

    def cut(seq: int) -> int:
        following = by_seq.get(seq + 1)
        return next((n for n, ev in enumerate(events) if ev.kind == "queued" and ev.edit_id == following), len(events))

    def live(upto: int) -> dict[int, str]:
        state: dict[int, str] = {}
        for ev in events[:upto]:
            if ev.kind in ("applied", "replayed"):
                state[ev.edit_id] = ev.detail.get("delta_sha256")
            elif ev.kind == "rolled_back":
                state.pop(ev.edit_id, None)
        return state

    first, last = cut(start), cut(end)
    out: dict[str, Any] = {"name": name, "from": start, "to": end, "added": [], "failed": [], "rolled_back": [],
                           "replayed": []}
    replays: dict[int, dict[str, Any]] = {}
    for ev in events[first:last]:
        edit = edits.get(ev.edit_id)
        if edit is None:
            continue
        item = {"id": edit.id, "seq": edit.seq, "time": ev.to_dict()["time"]}
        if ev.kind == "applied":
            out["added"].append({**item, "prompt": edit.prompt, "target": edit.target})
        elif ev.kind == "failed":
            out["failed"].append({**item, "reason": ev.detail.get("reason")})
        elif ev.kind == "rolled_back":
            out["rolled_back"].append({**item, "reason": ev.detail.get("reason")})
        elif ev.kind == "replayed":
            entry = replays.setdefault(edit.id, {**item, "times": 0, "reasons": []})
            entry["times"] += 1
            entry["time"] = item["time"]
            if ev.detail.get("reason") not in entry["reasons"]:
                entry["reasons"].append(ev.detail.get("reason"))
    out["replayed"] = list(replays.values())
    before, after = live(first), live(last)
    out["live"] = {"from": len(before), "to": len(after)}
    out["net"] = {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                  "changed": sorted(i for i in set(before) & set(after) if before[i] != after[i])}
    return out


@ledger.command("diff")
@store_options
@click.option("--json", "as_json", is_flag=True,
              help='{"added", "failed", "rolled_back", "replayed", "live", "net", ...} as one JSON object')
@click.argument("start", type=click.IntRange(min=0))
@click.argument("end", type=click.IntRange(min=0))
def diff(store_path: str | None, name: str | None, as_json: bool, start: int, end: int) -> None:
    """What changed in the memory between sequence numbers START and END (an audit): edits
    added, failed, rolled back and replayed, and the live edits gained, lost and changed."""
    from store import StoreError

    if end < start:
        fail(f"END ({end}) is before START ({start})", EXIT_INVALID)
    with open_store(store_path) as store:
        try:
            if name is None:
                names = [m.name for m in store.memories()]
                if len(names) != 1:
                    fail(f"the store holds {len(names)} memories ({', '.join(names) or 'none'}): name one with "
                         "--name", EXIT_INVALID)
                name = names[0]
            newest = max((e.seq for e in store.edits(name)), default=0)
            if end > newest:
                fail(f"memory {name!r} has no seq {end}: the newest is {newest}", EXIT_INVALID)
            report = _diff(store, name, start, end)
        except (StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    if as_json:
        emit_json(report)
        return
    click.echo(f"memory {name!r}, seq {start} → {end}: {len(report['added'])} added, {len(report['failed'])} failed, "
               f"{len(report['rolled_back'])} rolled back, {len(report['replayed'])} replayed "
               f"(live edits {report['live']['from']} → {report['live']['to']})")
    for item in report["added"]:
        click.echo(f"+ edit {item['id']} (seq {item['seq']}) applied: {_short(item['prompt'], 60)} → "
                   f"{_short(item['target'], 30)}")
    for item in report["failed"]:
        click.echo(f"x edit {item['id']} (seq {item['seq']}) failed: {_short(item['reason'], 80)}")
    for item in report["rolled_back"]:
        click.echo(f"- edit {item['id']} (seq {item['seq']}) rolled back: {_short(item['reason'], 80)}")
    for item in report["replayed"]:
        click.echo(f"~ edit {item['id']} (seq {item['seq']}) replayed ×{item['times']}: "
                   f"{_short('; '.join(map(str, item['reasons'])), 80)}")
