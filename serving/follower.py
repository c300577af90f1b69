"""`Follower` keeps a served model current in a long-running process: it listens for the worker's notices on `memoir.<name>.changes` and polls
the ledger every few seconds (the fallback when Redis is down), and hands each new snapshot to
a callback, which installs it between requests, never during a generation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from memoir import MemoryState
from pipeline.notify import changes_channel
from serving.model import ServedModel
from store.snapshots import Snapshot

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0
RESUBSCRIBE_SECONDS = 10.0
STALE_GRACE = 5.0  # seconds past two polls without a read of the ledger: no longer following
WAKE_SECONDS = 0.5  # how long `Follower.stop` may wait for a listening thread


class Follower:
    """Keeps a served model's memory current: on each change notice, and every `poll_seconds`
    whatever Redis does, it reads the ledger's (seq, version); when they moved it loads the new
    snapshot and passes it to `offer` (which installs it between requests)."""

    def __init__(self, served: ServedModel, offer: Callable[[Snapshot, MemoryState], None],
                 redis_url: str | None = None, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        if served.pinned:
            raise ValueError("a pinned model does not follow its memory")
        self.served = served
        self.offer = offer
        self.redis_url = redis_url
        self.poll_seconds = poll_seconds
        self.known = served.snapshot.mark
        self.notices = 0
        self.read_at = time.monotonic()  # when the ledger was last read (the load counts)
        self.error: str | None = None  # why the last read failed; None once one succeeds
        self._pubsub: Any = None
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memoir-follower", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._close_pubsub()

    @property
    def listening(self) -> bool:
        """Subscribed to the change notices (False: polling only)."""
        return self._pubsub is not None

    def health(self) -> dict[str, Any]:
        """`following`: the ledger is being read (the last read succeeded, within two polls and a
        grace); `lag_s`: seconds since the last successful read; `error`: why the last one failed."""
        lag = time.monotonic() - self.read_at
        following = self._thread.is_alive() and self.error is None and lag <= 2 * self.poll_seconds + STALE_GRACE
        return {"following": following, "lag_s": round(lag, 3), "error": self.error}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wait()
            if self._stop.is_set():
                return
            try:
                loaded = self.served.fetch(self.known)
            except Exception as exc:  # noqa: BLE001 - the store may be busy or briefly unreadable: poll again
                log.warning("could not reload memory %r: %s", self.served.name, exc)
                self.error = f"{type(exc).__name__}: {exc}".strip()
                continue
            if not self.health()["following"]:
                log.warning("reading the ledger of %r again after %.1fs", self.served.name,
                            time.monotonic() - self.read_at)
            self.read_at, self.error = time.monotonic(), None
            if loaded is not None:
                self.known = loaded[0].mark
                self.offer(*loaded)

    def _wait(self) -> None:
        """Until a notice arrives or `poll_seconds` pass."""
        if self._pubsub is None and time.monotonic() >= self._retry_at:
            self._subscribe()
        if self._pubsub is None:
            self._stop.wait(self.poll_seconds)
            return
        deadline = time.monotonic() + self.poll_seconds
        try:
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                message = self._pubsub.get_message(timeout=min(left, WAKE_SECONDS))
                if message is not None:
                    while message is not None:  # several notices: one reload up to the newest
                        self.notices += 1
                        message = self._pubsub.get_message(timeout=0)
                    return
        except Exception as exc:  # noqa: BLE001 - Redis went away: poll until it is back
            log.warning("lost the change notices of %r (%s); polling the store every %.1fs", self.served.name,
                        exc, self.poll_seconds)
            self._close_pubsub()
            self._retry_at = time.monotonic() + RESUBSCRIBE_SECONDS

    def _subscribe(self) -> None:
        from pipeline import settings

        try:
            client = settings.redis_client(self.redis_url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(changes_channel(self.served.name))
            self._pubsub = pubsub
            log.info("following memory %r: notices on %s, and the store every %.1fs", self.served.name,
                     changes_channel(self.served.name), self.poll_seconds)
        except Exception as exc:  # noqa: BLE001
            log.warning("no change notices (%s); polling the store every %.1fs", exc, self.poll_seconds)
            self._retry_at = time.monotonic() + RESUBSCRIBE_SECONDS

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # noqa: BLE001
                pass
            self._pubsub = None


__all__ = ["Follower"]
