"""`memoir serve`: the edited model behind an OpenAI-style HTTP endpoint (serving/app.py).

Loads the model and memory NAME from the store, newest (following the ledger: change notices
on Redis `memoir.<name>.changes`, and a poll of the store every `--poll` seconds) or pinned with
`--at-seq` (never moves). Binds 127.0.0.1 by default; `--port 0` takes a free port. It listens
at once and prints a line starting with `memoir serve listening:` and the URL (`/healthz` answers,
`/readyz` says 503 while the model and memory load), then one starting with `memoir serve ready:`
and the URL once it serves. A model or memory that cannot be loaded ends it with `error: ...`.
"""

from __future__ import annotations

import logging
import socket
import sys

import click

from pipeline.cli import EXIT_INVALID, fail
from pipeline.logs import log_format_option
from pipeline.model_options import model_option
from pipeline.runtime_options import device_option, dtype_option

READY_PREFIX = "memoir serve ready:"
LISTENING_PREFIX = "memoir serve listening:"

log = logging.getLogger(__name__)


@click.command("serve")
@model_option()
@click.option("--name", default="default", show_default=True, help="Memory name.")
@click.option("--store", "store_path", default=None,
              help="Store directory or database URL (default $MEMOIR_STORE, else ./memoir-store).")
@click.option("--tensors", "tensor_dir", default=None,
              help="Tensor directory or s3://bucket/prefix (default <store>/tensors, $MEMOIR_TENSORS).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--at-seq", type=click.IntRange(min=0), default=None,
              help="Serve the memory as it was at this ledger sequence number, and never move.")
@device_option()
@dtype_option()
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences generated together.")
@click.option("--batch-wait", type=click.FloatRange(min=0), default=0.005, show_default=True,
              help="Seconds the oldest request waits for others to batch with.")
@click.option("--max-tokens", "max_tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens one answer may generate (400 beyond); a chat request without max_tokens "
                   "generates to the end of the model's context, at most this many.")
@click.option("--poll", "poll_seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between polls of the store (the fallback when Redis is down).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body (413 beyond).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests admitted at once, waiting or generating (503 with Retry-After beyond).")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds a request may take, body to last token (408 for a slow body, 504 for the answer).")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY[:ro|:rw]",
              help="An API key (repeatable; read-write unless ':ro'); also $MEMOIR_API_KEYS, comma-separated. "
                   "With any key, every /v1/ route needs 'Authorization: Bearer KEY', and submitting or rolling "
                   "back edits a read-write one.")
@click.option("--loglevel", default="INFO", show_default=True)
@log_format_option
def serve(model_name: str, name: str, store_path: str | None, tensor_dir: str | None, host: str, port: int,
          at_seq: int | None, device: str, dtype: str | None, max_batch: int, batch_wait: float, max_tokens: int,
          poll_seconds: float, max_body_bytes: int, max_queue: int, request_timeout: float,
          api_keys: tuple[str, ...], loglevel: str, log_format: str) -> None:
    """Serve memory NAME over HTTP: /v1/completions, /v1/chat/completions, /v1/memory, /healthz, /readyz,
    and the edit API: POST /v1/edits, GET /v1/edits/ID, POST /v1/edits/ID/rollback, GET /v1/ledger
    (through Redis at $MEMOIR_REDIS_URL, like `memoir submit`).

    It listens at once (`/readyz` answers 503 until the model and memory are loaded)."""
    from pipeline import logs
    from serving.keys import KeyConfigError, Keys, exposure_warning

    try:
        keys = Keys.from_options(api_keys)
    except KeyConfigError as exc:
        fail(str(exc), EXIT_INVALID)
    warning = exposure_warning(host, keys)
    if warning is not None:
        click.echo(warning, err=True)
    as_json = logs.setup(loglevel, log_format)
    import uvicorn
    from peewee import DatabaseError

    from memoir import ConfigError, MemoryMismatchError
    from store import StoreError
    from serving.app import create_app
    from serving.edits import EditAPI
    from serving.engine import Engine
    from serving.follower import Follower
    from serving.http import Limits
    from serving.model import load

    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    loaded: list = []  # the ServedModel, once loaded
    edits = EditAPI(name)
    failed: list[BaseException] = []

    def start() -> tuple:
        served = load(model_name, store=store_path, name=name, at_seq=at_seq, device=device, dtype=dtype,
                      tensor_dir=tensor_dir)
        loaded.append(served)
        engine = Engine(served, max_batch=max_batch, batch_wait=batch_wait, max_tokens_limit=max_tokens)
        return engine, None if served.pinned else Follower(served, engine.offer, poll_seconds=poll_seconds)

    def ready() -> None:
        served = loaded[0]
        click.echo(f"{READY_PREFIX} {url} memory {name!r} at seq {served.seq} (version {served.version}, "
                   f"{'pinned' if served.pinned else 'following'}), model {model_name}")
        sys.stdout.flush()

    def failure(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    try:
        sock.listen(128)
        click.echo(f"{LISTENING_PREFIX} {url} (loading the model and memory {name!r})")
        sys.stdout.flush()
        app = create_app(start, Limits(max_body_bytes, max_queue, request_timeout), on_ready=ready,
                         on_failure=failure, edits=edits, keys=keys)
        config = uvicorn.Config(app, log_level=loglevel.lower(), access_log=False, timeout_graceful_shutdown=5,
                                **({"log_config": None} if as_json else {}))  # uvicorn's lines: JSON too
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        for served in loaded:
            served.close()
        edits.close()
        sock.close()
    if failed:
        if isinstance(failed[0], (StoreError, ConfigError, MemoryMismatchError, OSError, ValueError, DatabaseError)):
            fail(str(failed[0]).strip())
        raise failed[0]
