"""`memoir queue dead|retry|drop`: the items a worker parked instead of running (no torch)."""

from __future__ import annotations

import click

from pipeline.cli import emit_json, fail

NAME_OPTION = click.option("--name", default="default", show_default=True, help="Memory name (queue memoir.<name>).")


@click.group("queue")
def queue() -> None:
    """A memory's dead letters: queue items its worker parked in memoir.<name>.dead."""


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
    except (RequestError, BrokerError) as exc:
        fail(str(exc))
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
    except (RequestError, BrokerError, UnknownDeadLetterError) as exc:
        fail(str(exc))
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
