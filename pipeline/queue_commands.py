"""`memoir queue`: each memory's queue length and the worker serving it; `memoir queue
dead|retry|drop`: the items a worker parked instead of running (no torch)."""

from __future__ import annotations

import click

from typing import Any

from pipeline.cli import EXIT_INVALID, EXIT_UNAVAILABLE, emit_json, fail

NAME_OPTION = click.option("--name", default="default", show_default=True, help="Memory name (queue memoir.<name>).")


@click.group("queue", invoke_without_command=True)
@click.option("--name", default=None, help="Only this memory (default: every memory with a queue or a worker).")
@click.option("--json", "as_json", is_flag=True,
              help='A JSON array: {"name", "queue", "queued", "dead", "worker"} per memory (worker: null when none).')
@click.pass_context
def queue(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Each memory's queue: how many requests wait on memoir.<name>, how many were parked in
    memoir.<name>.dead, and the worker serving it (none: the requests wait until one starts).
    Subcommands handle the dead letters."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.client import BrokerError, RequestError

    try:
        rows = overview(_client(), name)
    except RequestError as exc:
        fail(str(exc), EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no queues and no workers")
        return
    from pipeline.tables import echo_table

    def who(w: dict[str, Any] | None) -> str:
        return (f"{w.get('host')} pid {w.get('pid')}: {w.get('model')} on {w.get('device')}, since {w.get('started_at')}"
                if w else "none: the requests wait")

    echo_table(["memory", "queue", "queued", "dead", "worker"],
               ([r["name"], r["queue"], r["queued"], r["dead"], who(r["worker"])] for r in rows),
               widths={"worker": 120}, right=["queued", "dead"])


def overview(client: Any, name: str | None = None) -> list[dict[str, Any]]:
    """One row per memory that has a queue, dead letters or a live worker (or just `name`)."""
    import json

    from pipeline import settings
    from pipeline.schema import NAME_PATTERN, check_name

    prefix = settings.KEY_PREFIX

    def scan() -> set[str]:
        names: set[str] = set()
        for key in client.redis.scan_iter(match=f"{prefix}.*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            found = key[len(prefix) + 1:].removesuffix(".dead")
            if NAME_PATTERN.fullmatch(found):
                names.add(found)
        for key in client.redis.scan_iter(match=settings.worker_key("x")[:-1] + "*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            found = key.rpartition(":")[2]
            if NAME_PATTERN.fullmatch(found):
                names.add(found)
        return names

    names = [check_name(name)] if name is not None else sorted(client._call("listing queues", scan))
    rows = []
    for memory in names:
        queue_key = settings.queue_name(memory)

        def read(memory: str = memory, queue_key: str = queue_key) -> tuple[int, int, Any]:
            pipe = client.redis.pipeline(transaction=False)
            pipe.llen(queue_key).llen(f"{queue_key}.dead").get(settings.worker_key(memory))
            return tuple(pipe.execute())  # type: ignore[return-value]

        queued, dead, worker = client._call("reading the queue", read)
        rows.append({"name": memory, "queue": queue_key, "queued": int(queued), "dead": int(dead),
                     "worker": json.loads(worker) if worker else None})
    return rows


def _client():
    from pipeline.client import Client

    return Client()


@queue.command("dead")
@NAME_OPTION
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the entries (raw items included).")
def dead(name: str, as_json: bool) -> None:
    """List the dead letters, oldest first: id, time, size and why each was parked."""
    from pipeline.client import BrokerError, RequestError

    try:
        found = _client().dead_letters(name)
    except RequestError as exc:
        fail(str(exc), EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo(f"no dead letters for memoir.{name}")
        return
    for entry in found:
        click.echo(f"{entry.get('id')}  {entry.get('time')}  {entry.get('size')} bytes  {entry.get('reason')}")
    click.echo(f"{len(found)} dead letters in memoir.{name}.dead")


def _act(verb: str, entry_id: str, name: str, as_json: bool) -> None:
    from pipeline.client import BrokerError, RequestError, UnknownDeadLetterError

    client = _client()
    try:
        entry = (client.retry_dead if verb == "retry" else client.drop_dead)(entry_id, name)
    except (RequestError, UnknownDeadLetterError) as exc:
        fail(str(exc), EXIT_INVALID)
    except BrokerError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if as_json:
        emit_json({"id": entry_id, "name": name, "action": verb, "reason": entry.get("reason")})
    else:
        done = f"put back on memoir.{name}" if verb == "retry" else "dropped"
        click.echo(f"dead letter {entry_id} {done} (it had been parked: {entry.get('reason')})")


def _entry_command(verb: str, doc: str) -> click.Command:
    @queue.command(verb, help=doc)
    @click.argument("entry_id")
    @NAME_OPTION
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
    def command(entry_id: str, name: str, as_json: bool) -> None:
        _act(verb, entry_id, name, as_json)

    return command


retry = _entry_command("retry", "Put dead letter ENTRY_ID back at the end of its queue (it runs, or is parked again).")
drop = _entry_command("drop", "Delete dead letter ENTRY_ID for good.")
