"""`memoir worker`: serve one memory's queue with one model, one edit at a time.

Start-up order: take the memory's writer lock (a second worker on the same memory refuses to
start, or waits `--lock-wait` seconds), load the model and the memory from the store once,
resume this memory's `queued`/`applying` rows left by a crash, then consume `memoir.<name>`
with Celery's solo pool (concurrency 1, prefetch 1, late acknowledgement). When it is ready
it prints one line on stdout starting with `memoir worker ready:`.
"""

from __future__ import annotations

import logging
import socket
import sys

import click

from pipeline.cli import EXIT_INVALID, EXIT_UNAVAILABLE, fail
from pipeline.runtime_options import device_option, dtype_option, n_iter_option, threshold_option
from pipeline.store_commands import checkpoint_every_option, keep_checkpoints_option
from pipeline.model_options import prompt_format_option
from pipeline.logs import log_format_option
from pipeline.model_options import model_option, module_path_option

READY_PREFIX = "memoir worker ready:"

log = logging.getLogger(__name__)


@click.command()
@model_option()
@click.option("--name", default="default", show_default=True, help="Memory name; consumes queue memoir.<name>.")
@click.option("--store", "store_path", default=None,
              help="Store directory or database URL (default $MEMOIR_STORE, else ./memoir-store).")
@click.option("--tensors", "tensor_dir", default=None,
              help="Tensor directory or s3://bucket/prefix (default <store>/tensors, $MEMOIR_TENSORS).")
@click.option("--layer", type=int, default=None, help="Edited layer (new memory; must match a stored one).")
@click.option("--top-k", type=int, default=None, help="Mask size k (new memory; must match a stored one).")
@threshold_option()
@device_option()
@dtype_option()
@n_iter_option()
@module_path_option
@prompt_format_option
@click.option("--lock-wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another worker's writer lock before giving up.")
@keep_checkpoints_option
@checkpoint_every_option
@click.option("--loglevel", default="INFO", show_default=True)
@log_format_option
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve Prometheus metrics on this port (0: off).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics port binds.")
@click.option("--events", is_flag=True,
              help="Send Celery task events and answer remote control, for Flower and `celery inspect`.")
def worker(model_name: str, name: str, store_path: str | None, tensor_dir: str | None, layer: int | None,
           top_k: int | None, threshold: float | None, device: str, dtype: str | None, n_iter: int | None,
           module_path: str | None, lock_wait: float, keep_checkpoints: int, checkpoint_every: int | None,
           loglevel: str, log_format: str,
           metrics_port: int, metrics_host: str, events: bool,
           prompt_format: str | None = None) -> None:
    """Serve memory NAME: apply the edits of queue memoir.<NAME> serially into the store."""
    from pipeline import logs

    logs.setup(loglevel, log_format, celery_tasks=True)
    from celery import signals

    from pipeline import settings
    from pipeline.local_redis import answers
    from pipeline.schema import RequestError, check_name
    from store import StoreError, WriterLockedError

    try:
        check_name(name)
    except RequestError as exc:
        fail(str(exc), EXIT_INVALID)
    url = settings.redis_url()
    if not answers(url, timeout=5):
        fail(f"no Redis answers at {settings.redact(url)} (set MEMOIR_REDIS_URL)", EXIT_UNAVAILABLE)

    from memoir import ConfigError, MemoirConfig, MemoryMismatchError, UnknownArchitectureError
    from memoir.sources import resolve_model
    from workers import activations, tasks
    from workers.runtime import Runtime
    from workers.status_mirror import MirroringStore, Presence, StatusBoard

    resolve_model(model_name)  # fetch or convert it now: a model that cannot be had touches no store
    try:
        store = MirroringStore.open(store_path, tensor_dir)
    except StoreError as exc:
        fail(str(exc), EXIT_INVALID)
    runtime = None
    presence = None
    try:
        # Refuse at once, before minutes of model loading, when another worker holds the memory.
        store.writer_lock(name, wait=lock_wait).release()
        config = MemoirConfig(n_iter=n_iter) if n_iter is not None else None
        runtime = Runtime.open(model_name, store=store, name=name, layer=layer, top_k=top_k, device=device,
                               dtype=dtype, threshold=threshold, config=config, lock_wait=lock_wait,
                               module_path=module_path, keep_checkpoints=keep_checkpoints,
                               checkpoint_every=checkpoint_every, prompt_format=prompt_format)
        redis_client = settings.redis_client(url)
        board = StatusBoard(redis_client, name)
        store.board = board
        resumed = runtime.resume()
        if resumed:
            log.info("resumed %d pending edits of %r: %s", len(resumed), name,
                     ", ".join(f"{r['request_id']} {r['status']}" for r in resumed))
        log.info("captured the activations of %d live edits for rollbacks", activations.warm(runtime))
        tasks.serve(runtime, board)
        presence = Presence(redis_client, name, {"model": model_name, "store": store.location,
                                                 "device": device}).start()
        queue = settings.queue_name(name)
        if metrics_port:
            from workers.metrics import WorkerMetrics

            try:
                port = WorkerMetrics(runtime, redis_client, queue).connect().serve(metrics_host, metrics_port)
            except OSError as exc:
                fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror or exc}")
            log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, port)
        if events:  # Flower and `celery inspect` see the worker (any Redis client may then control it)
            tasks.app.conf.update(worker_send_task_events=True, task_send_sent_event=True,
                                  worker_enable_remote_control=True)

        def ready(**_: object) -> None:
            click.echo(f"{READY_PREFIX} memory {name!r} on queue {queue}, model {model_name}, "
                       f"store {store.location}, redis {settings.redact(url)}")
            sys.stdout.flush()

        signals.worker_ready.connect(ready, weak=False)
        celery_worker = tasks.app.Worker(
            hostname=f"memoir-{name}@{socket.gethostname()}", pool_cls="solo", concurrency=1, queues=[queue],
            loglevel=loglevel.upper(), quiet=True, redirect_stdouts=False,
            without_mingle=True, without_gossip=True, without_heartbeat=not events,
        )
        celery_worker.start()
        code = celery_worker.exitcode or 0
    except WriterLockedError as exc:
        fail(f"refusing to start: {exc}")
    except (StoreError, ConfigError, MemoryMismatchError, UnknownArchitectureError) as exc:
        fail(str(exc), EXIT_INVALID)
    finally:
        if presence is not None:
            presence.stop()
        if runtime is not None:
            runtime.close()
        store.close()
    sys.exit(code)
