"""Change notices: after each commit that changes a memory (an edit applied, rolled back or
replayed), the worker publishes a small JSON notice on the Redis pub/sub channel
`memoir.<name>.changes`, so that serving processes reload at once instead of at their next poll.

A notice is a hint, never the truth: a server that gets one reads the ledger's sequence number
and version and reloads from the store. Publishing never raises: a notice lost while Redis is
down is made up for by the servers' polling.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from pipeline import settings
from store import APPLIED, ROLLED_BACK, EditRecord

if TYPE_CHECKING:
    import redis

    from store import Store

log = logging.getLogger(__name__)


def changes_channel(name: str) -> str:
    """The pub/sub channel of memory `name`: `memoir.<name>.changes`."""
    return f"{settings.queue_name(name)}.changes"


def publish_change(client: "redis.Redis", store: "Store", edit: EditRecord) -> None:
    """Publish {name, seq, version, edit_id, status} after a commit left `edit` applied or rolled back."""
    if edit.status not in (APPLIED, ROLLED_BACK):
        return
    try:
        notice: dict[str, Any] = {"name": edit.memory, "seq": edit.seq, "edit_id": edit.id, "status": edit.status,
                                  "version": store.get_memory(edit.memory).version}
        client.publish(changes_channel(edit.memory), json.dumps(notice, sort_keys=True))
    except Exception as exc:  # noqa: BLE001 - servers poll the ledger as well
        log.warning("could not publish the change notice of edit %d: %s", edit.id, exc)


__all__ = ["changes_channel", "publish_change"]
