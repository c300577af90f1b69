"""`memoir store compact`: prune a store's old checkpoints (no torch).

Safe by construction (store/checkpoints.py): only checkpoints go, never a delta, so every past
memory can still be rebuilt; a reader that planned on a pruned checkpoint falls back on an older
one. It takes each memory's writer lock first and refuses a memory a worker holds: that worker
prunes its own checkpoints after each one it takes (`memoir worker --keep-checkpoints`), and no
checkpoint is ever written while this command prunes.
"""

from __future__ import annotations

import click

from pipeline.cli import EXIT_INVALID, emit_json, fail
from pipeline.ledger_commands import STORE_HELP, open_store
from store.checkpoints import DEFAULT_KEEP


keep_checkpoints_option = click.option(
    "--keep-checkpoints", "keep_checkpoints", type=click.IntRange(min=1), default=DEFAULT_KEEP, show_default=True,
    help="checkpoints of the memory kept (the newest; the older ones are pruned after each new one)")
checkpoint_every_option = click.option(
    "--checkpoint-every", "checkpoint_every", type=click.IntRange(min=1), default=None,
    help="changes of W_m between checkpoints, recorded with the memory [default: as recorded; 25 for a new "
         "memory]; a restart adds at most this many deltas minus one to the newest checkpoint")


@click.group("store")
def store() -> None:
    """Maintain the store: prune old checkpoints."""


def _orphans(s, name: str) -> list:
    """Files of the checkpoint directory no ledger row names (a crash between a prune's commit and
    its deletions, or between writing a checkpoint and committing it): safe to delete under the lock."""
    named = {c.file for c in s.checkpoints(name)}
    return [blob for blob in s.blobs.list(f"{name}/checkpoints/") if blob.key not in named]


@store.command("compact")
@click.option("--store", "store_path", default=None, help=STORE_HELP)
@click.option("--name", default=None, help="memory name (default: every memory)")
@keep_checkpoints_option
@click.option("--json", "as_json", is_flag=True, help='{"<memory>": {"removed", "kept", "bytes_freed", "orphans"}}')
def compact(store_path: str | None, name: str | None, keep_checkpoints: int, as_json: bool) -> None:
    """Remove all but the newest checkpoints of each memory (and orphan checkpoint files).
    Refuses a memory whose writer lock a worker holds."""
    from store import StoreError, WriterLockedError

    out = {}
    with open_store(store_path) as s:
        try:
            names = [name] if name is not None else [m.name for m in s.memories()]
            for memory in names:
                s.get_memory(memory)
                with s.writer_lock(memory):
                    removed = s.prune_checkpoints(memory, keep_checkpoints)
                    orphans = _orphans(s, memory)
                    freed = sum(c.bytes for c in removed) + sum(blob.size for blob in orphans)
                    for blob in orphans:
                        s.blobs.delete(blob.key)
                    kept = [c.version for c in s.checkpoints(memory)]
                out[memory] = {"removed": [c.version for c in removed], "kept": kept, "bytes_freed": freed,
                               "orphans": [blob.key.rpartition("/")[2] for blob in orphans]}
        except WriterLockedError as exc:
            fail(f"refusing to compact: {exc} (its writer lock is taken); a running worker prunes its own "
                 "checkpoints (--keep-checkpoints)")
        except (StoreError, KeyError) as exc:
            fail(str(exc), EXIT_INVALID)
    if as_json:
        emit_json(out)
        return
    for memory, r in out.items():
        removed = f"removed {len(r['removed'])} checkpoints"
        if r["removed"]:
            removed += " (" + ", ".join(f"v{v}" for v in r["removed"]) + ")"
        if r["orphans"]:
            removed += f" and {len(r['orphans'])} orphan files"
        click.echo(f"memory {memory!r}: {removed}, kept {len(r['kept'])}, freed {r['bytes_freed']} bytes")


__all__ = ["checkpoint_every_option", "compact", "keep_checkpoints_option", "store"]
