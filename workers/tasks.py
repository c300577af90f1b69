"""The Celery tasks a memory's worker runs, one at a time, from its queue `memoir.<name>`.

Messages are JSON (the app refuses anything else). Each task is acknowledged late, only after
its outcome is in the ledger: `runtime.apply_request` records the request first (taking its
sequence number), so a worker that dies mid-edit leaves a `queued`/`applying` row that the next
worker resumes at start, and the redelivered message then finds it done (idempotent by id).

`memoir worker` (workers/worker_command.py) loads the runtime and calls `serve()` before it
starts consuming; these functions only dispatch to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from celery.worker import state as worker_state
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str

from pipeline import deadletter, settings
from pipeline.envelope import BadItem, check_item
from pipeline.schema import REQUEST_ID_PATTERN

if TYPE_CHECKING:
    from workers.runtime import Runtime
    from workers.status_mirror import StatusBoard

log = logging.getLogger(__name__)


# -- kombu's Redis channel, hardened: the worker must not stop or stall on -----------------------
# 1. an item on the queue that is not a message it runs: kombu decodes each popped item outside
#    Celery's error handling, and Celery trusts the headers and the body's links, so anyone who
#    can write to Redis could end the worker (a list as the task id, a bad time limit, ...). Each
#    item is checked whole first (pipeline/envelope.py); one that fails is parked in
#    `memoir.<name>.dead` with the reason (pipeline/deadletter.py) and never reaches Celery;
# 2. an ack lost to a Redis restart: kombu keeps the message's prefetch slot, so the worker
#    (prefetch 1) would never fetch again (GuardedQoS).

_taken: dict[str, bytes] = {}  # task id -> the raw item it came in (the task parks it if it fails)


def memory_of(queue: str) -> str:
    """The memory whose queue this is: `memoir.<name>` -> name."""
    return queue.split(".", 1)[1]


def take(client: Any, queue: str, raw: bytes) -> bool:
    """Whether queue item `raw` goes on to Celery; an item that is not a message this worker runs
    is parked instead (a Redis error while parking puts it back on the queue, if Redis allows,
    and propagates: kombu reconnects)."""
    try:
        envelope = check_item(raw, queue)
    except BadItem as exc:
        reason = f"not a message this worker runs: {exc}"
        log.error("parking an item of %s (%s): %.200r", queue, reason, raw)
        try:
            entry = deadletter.park(client, memory_of(queue), raw, reason)
        except Exception:
            client.rpush(queue, raw)  # back where it was taken from (kombu pops the right end), if Redis lets us
            raise
        log.error("parked as dead letter %s", entry)
        return False
    if len(_taken) > 64:  # a message Celery took but never ran (it cannot be: prefetch 1); bounded anyway
        _taken.clear()
    _taken[envelope["headers"]["id"]] = raw
    return True


class GuardedQoS(kombu_redis.QoS):
    """An ack that cannot reach Redis (it restarted mid-task) still frees the prefetch slot; with
    prefetch 1 the worker would otherwise never fetch again. The message stays in Redis's unacked
    set and comes back after the visibility timeout, where the ledger makes it a duplicate."""

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except Exception:
            kombu_virtual.QoS.ack(self, delivery_tag)
            raise

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue)
        except Exception:
            kombu_virtual.QoS.ack(self, delivery_tag)
            raise


class GuardedChannel(kombu_redis.Channel):
    QoS = GuardedQoS

    def _brpop_read(self, **options: Any) -> Any:
        client = self.client
        parse = client.parse_response

        def checked(connection: Any, command: str, **kwargs: Any) -> Any:
            reply = parse(connection, command, **kwargs)
            if command == "BRPOP" and reply:
                queue = bytes_to_str(reply[0]).rsplit(self.sep, 1)[0]
                with self.conn_or_acquire() as other:
                    if not take(other, queue, reply[1]):
                        return None  # kombu then polls again
            return reply

        client.parse_response = checked
        try:
            return super()._brpop_read(**options)
        finally:
            del client.parse_response


class GuardedRedisTransport(kombu_redis.Transport):
    Channel = GuardedChannel


for _scheme in ("redis", "rediss"):  # the same names, so kombu treats the URLs as before
    kombu_transport.TRANSPORT_ALIASES[_scheme] = f"{__name__}:GuardedRedisTransport"
    kombu_transport._transport_cache.pop(_scheme, None)

app = settings.make_app()

_runtime: "Runtime | None" = None
_board: "StatusBoard | None" = None


def serve(runtime: "Runtime", board: "StatusBoard") -> None:
    """Make the tasks of this process apply to `runtime` and mirror to `board`."""
    global _runtime, _board
    _runtime, _board = runtime, board


def _serving() -> tuple["Runtime", "StatusBoard"]:
    if _runtime is None or _board is None:
        _stop("this worker process serves no memory (serve() was not called)")
    return _runtime, _board  # type: ignore[return-value]


def _stop(reason: str) -> None:
    """This worker must not go on: put the message back and shut down after this task."""
    log.critical("stopping the worker: %s", reason)
    worker_state.should_stop = 70  # EX_SOFTWARE
    raise Reject(reason, requeue=True)


def _refused(request_id: str, reason: str) -> dict[str, Any]:
    return {"request_id": request_id, "edit_id": None, "seq": None, "status": "failed", "scores": None,
            "reason": reason, "loss": None, "steps": None, "seconds": None}


@contextmanager
def _applied_held(runtime: "Runtime", board: "StatusBoard", request_id: str) -> Iterator[None]:
    """While an edit supersedes others, the ledger's mirror does not publish its `applied`
    status: a producer waiting on it sees it with the task's outcome, once the edits it
    replaces are rolled back too. Every other status change is mirrored as usual."""
    from store import APPLIED
    from workers.status_mirror import StatusBoard

    class Holding(StatusBoard):
        def publish_edit(self, edit: Any) -> None:
            if edit.request_id != request_id or edit.status != APPLIED:
                super().publish_edit(edit)

    store = runtime.store
    if getattr(store, "board", None) is not board:
        yield
        return
    store.board = Holding(board.redis, board.name)
    try:
        yield
    finally:
        store.board = board


def infrastructure(exc: BaseException) -> bool:
    """Whether an error is the infrastructure's — the ledger, the tensor files or Redis
    unreachable or unwritable, the writer lock lost, no memory left — rather than the message's."""
    import peewee
    import redis
    from kombu.exceptions import OperationalError

    from store import FencingError, WriterLockedError
    from store.tensors import CorruptFileError

    import torch

    kinds = (OSError, MemoryError, torch.OutOfMemoryError, FencingError, WriterLockedError, CorruptFileError,
             peewee.OperationalError, peewee.InterfaceError, peewee.InternalError, redis.ConnectionError,
             redis.TimeoutError, OperationalError)
    return isinstance(exc, kinds) or isinstance(exc.__cause__, kinds)


def _version(runtime: "Runtime") -> int:
    return runtime.store.get_memory(runtime.name).version


def _run(task: Any, kind: str, request: Any, handler: Callable[["Runtime", "StatusBoard", str], dict[str, Any]]
         ) -> dict[str, Any]:
    """`handler(runtime, board, task id)` for one message. An infrastructure error stops the
    worker with the message put back (the next worker takes it again); any other error is the
    message's: it is parked in `memoir.<name>.dead`, its status says so, and the worker goes on
    (after a restart, to reload the memory from the ledger, if the memory changed meanwhile)."""
    runtime, board = _serving()
    task_id = task.request.id
    raw = _taken.pop(task_id, None)
    before = None
    try:
        before = _version(runtime)
        return handler(runtime, board, task_id)
    except Exception as exc:  # noqa: BLE001 - sorted below: the infrastructure's fault, or the message's
        if infrastructure(exc):
            _stop(f"{type(exc).__name__}: {exc}")
        reason = f"the {kind} failed on what the message holds: {type(exc).__name__}: {exc}"
        log.exception("request %s: %s", task_id, reason)
        if raw is None:  # every message passes `take`; should one not, park what Celery decoded
            raw = settings.dumps({"task": task.name, "id": task_id, "request": request}).encode()
        try:
            entry = deadletter.park(board.redis, runtime.name, raw, reason)
            moved = _version(runtime) != before
        except Exception as err:  # noqa: BLE001 - Redis or the ledger gone: keep the message for the next worker
            _stop(f"could not park message {task_id} ({reason}): {type(err).__name__}: {err}")
        outcome = {**_refused(task_id, f"parked as dead letter {entry}: {reason}"), "kind": kind}
        board.publish_outcome(outcome)
        if moved:  # the ledger moved while it failed: the memory in RAM may not follow it
            log.critical("stopping the worker to reload memory %r from the ledger (message %s parked as %s)",
                         runtime.name, task_id, entry)
            worker_state.should_stop = 70
        return outcome


@app.task(name=settings.APPLY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def apply_edit(self: Any, request: Any) -> dict[str, Any]:
    """Apply one edit request (a JSON object; its `request_id` is this task's id). One that
    names the edit it `replaces` rolls that one back in this same task (workers/supersede.py:
    apply_superseding), so both happen in queue order with the other edits."""
    from workers.supersede import apply_superseding

    def handle(runtime: "Runtime", board: "StatusBoard", task_id: str) -> dict[str, Any]:
        if not isinstance(request, dict):
            outcome = _refused(task_id, f"the message is not a JSON object but {type(request).__name__}")
        elif not REQUEST_ID_PATTERN.fullmatch(task_id):
            outcome = _refused(task_id, f"request_id: must be 1-128 letters, digits or '_.:-', got {task_id!r}")
        elif request.get("request_id", task_id) != task_id:
            outcome = _refused(task_id, f"the message's request_id {request.get('request_id')!r} is not its task id")
        else:
            superseding = request.get("replaces") is not None
            with _applied_held(runtime, board, task_id) if superseding else nullcontext():
                outcome = apply_superseding(runtime, {**request, "request_id": task_id})
        board.publish_outcome(outcome)
        superseded = [s["rolled_back"] for s in outcome.get("superseded") or []]
        log.info("request %s: %s (edit %s, seq %s)%s%s", task_id, outcome["status"], outcome.get("edit_id"),
                 outcome.get("seq"), f", superseded edits {superseded}" if superseded else "",
                 f": {outcome['reason']}" if outcome.get("reason") else "",
                 extra={"request_id": task_id, "edit_id": outcome.get("edit_id")})
        return outcome

    return _run(self, "edit", request, handle)


# -- rollback and replay (issue 5: the work is in workers/rollback.py and workers/replay.py) --
# They travel the same queue as edits, so they are ordered with them.


def _chunked(task: Any, kind: str, request: Any, handler: Callable[..., tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """A rollback or replay message: the handler's outcome is published, and its next chunk,
    if any, is queued behind the edits waiting now."""

    def handle(runtime: "Runtime", board: "StatusBoard", task_id: str) -> dict[str, Any]:
        outcome, more = handler(runtime, task_id, request, settings.visibility_timeout() / 3)
        if more is not None:
            app.send_task(task.name, kwargs={"request": more}, task_id=more["request_id"],
                          queue=settings.queue_name(runtime.name))
        board.publish(outcome)
        log.info("%s %s: %s%s%s", kind, outcome["request_id"], outcome["status"],
                 f" (edit {outcome['edit_id']})" if outcome.get("edit_id") is not None else "",
                 f": {outcome['reason']}" if outcome.get("reason") else "")
        return outcome

    return _run(task, kind, request, handle)


@app.task(name=settings.ROLLBACK_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def rollback(self: Any, request: Any) -> dict[str, Any]:
    """Roll back one edit: {request_id, edit, reason, exact, name}. Re-optimising the edits it
    affects runs in chunks shorter than the visibility timeout: an unfinished job sends its next
    chunk {job, edit, name} to this queue; the ledger is the cursor (workers/rollback.py)."""
    from workers.rollback import rollback_message

    return _chunked(self, "rollback", request, rollback_message)


@app.task(name=settings.REPLAY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def replay(self: Any, request: Any) -> dict[str, Any]:
    """Rebuild the memory from the ledger and check it against the stored and the live memory:
    {request_id, name, from_seq?, mode?: "retrain"|"sum"}; it changes no memory. A long replay
    runs in chunks like a rollback (its progress is saved in the ledger)."""
    from workers.replay import replay_message

    return _chunked(self, "replay", request, replay_message)
