"""Runtime: one model, its MEMOIR Editor and the store, serving one memory name.

`apply_request` is the single code path that applies an edit, used by `memoir apply` and by
the Celery task (through `workers.supersede.apply_superseding`, which also rolls back the edit a
request `replaces`): the ledger first (the request is recorded and gets its sequence number),
then queued → applying → train → acceptance policy → delta file → applied; any failure
marks the row failed with its reason and leaves W_m exactly as it was.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from memoir import EditResult, Editor, MemoirConfig, MemoryMismatchError, detach, find_memory
from memoir.sources import load_model, resolve_model, torch_dtype
from memoir.tinymodel import zsre_records
from pipeline.schema import RequestError, check_bounds
from store import (
    FAILED,
    EditRecord,
    FencingError,
    InvalidRequestError,
    RequestConflictError,
    Store,
    WriterLock,
)
from store.checkpoints import DEFAULT_KEEP, check_keep
from store.records import PENDING

log = logging.getLogger(__name__)

BACKGROUND_RECORDS = slice(400, 450)  # zsRE records whose `loc` questions make the default background


def default_background_prompts() -> list[str]:
    """The `loc` questions of the shipped zsRE records 400..449: unrelated to the edits of 0..399."""
    return [r["loc"] for r in zsre_records()[BACKGROUND_RECORDS] if r.get("loc")]


@dataclass
class Policy:
    """Acceptance policy of a memory: refuse (revert, mark failed) an edit whose own scores stay
    below a floor. Stored with the memory as {"min_scores": {"rel": 0.9, ...}}."""

    min_scores: dict[str, float]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Policy":
        floors = (data or {}).get("min_scores") or {}
        return cls({str(k): float(v) for k, v in floors.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"min_scores": dict(self.min_scores)} if self.min_scores else {}

    def shortfalls(self, scores: dict[str, float]) -> list[str]:
        return [f"{name} {scores.get(name, float('nan')):.3f} < {floor:.3f}"
                for name, floor in sorted(self.min_scores.items())
                if not scores.get(name, float("-inf")) >= floor]


class Runtime:
    """One model + its Editor + the store, for one memory name. Open with `Runtime.open`."""

    def __init__(self, editor: Editor, store: Store, name: str, model_id: str, lock: WriterLock | None,
                 owns_store: bool, persistent: bool = True, keep_checkpoints: int = DEFAULT_KEEP) -> None:
        self.editor = editor
        self.keep_checkpoints = check_keep(keep_checkpoints)  # the newest checkpoints kept after each new one
        self.store = store
        self.name = name
        self.model_id = model_id
        self.lock = lock
        self.persistent = persistent
        self._owns_store = owns_store
        self.policy = Policy.from_dict(store.get_memory(name).policy) if persistent else Policy({})

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | os.PathLike | nn.Module, store: Store | str | os.PathLike | None = None,
             name: str = "default", layer: int | None = None, top_k: int | None = None, device: str = "cpu",
             dtype: str | torch.dtype | None = None, threshold: float | None = None, *, tokenizer: Any = None,
             module_path: str | None = None, prompt_format: str | None = None,
             config: MemoirConfig | None = None, background_prompts: Sequence[str] | None = None,
             policy: dict[str, Any] | None = None, checkpoint_every: int | None = None,
             readonly: bool = False, lock_wait: float = 0.0, tensor_dir: str | os.PathLike | None = None,
             fast: bool = True, keep_checkpoints: int = DEFAULT_KEEP) -> "Runtime":
        """Load `model` (any `--model` value: "builtin", "smollm2", a .gguf file, a directory, a hub
        id; see memoir.sources; or a model object with `tokenizer`), then restore memory `name`
        from the store, or create it on first use. The model is loaded before the store is
        opened: a model that cannot be loaded (ModelSourceError) leaves the store untouched.

        A writer (the default) takes the memory's writer lock (waiting `lock_wait` seconds).
        `readonly` takes no lock and writes nothing (generation); a memory the store lacks is
        then an empty one in RAM. `config`, `background_prompts`, `policy` and
        `checkpoint_every` are used when the memory is created (`keep_checkpoints`: how many of
        the newest checkpoints a writer keeps); `layer`/`top_k`/`threshold`/`prompt_format`/
        `module_path` (the edited projection, with `{layer}`; by default found from the model's
        structure) must agree with a stored memory (MemoryMismatchError otherwise)."""
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise ValueError("a model object needs its tokenizer")
            model_id = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
            revision = getattr(model.config, "_commit_hash", None)
            loaded, tok = model.to(device), tokenizer
        else:
            model_id = str(model)
            loaded, tok, revision = load_model(model, dtype=torch_dtype(dtype), device=device)
        owns_store = not isinstance(store, Store)
        store = store if isinstance(store, Store) else Store.open(store, tensor_dir)
        lock = None
        try:
            if not readonly:
                lock = store.writer_lock(name, wait=lock_wait)
            overrides = {"layer": layer, "top_k": top_k, "threshold": threshold, "prompt_format": prompt_format}
            if store.has_memory(name):
                state = store.load_state(name, device=device)  # W_m rebuilt where it will live
                wrong = [f"{key} {value} (stored: {getattr(state.config, key)})" for key, value in overrides.items()
                         if value is not None and value != getattr(state.config, key)]
                if module_path and module_path.replace("{layer}", str(state.config.layer)) != state.model.module_path:
                    wrong.append(f"module_path {module_path} (stored: {state.model.module_path})")
                if wrong:
                    raise MemoryMismatchError(f"memory {name!r} was made with other settings: " + ", ".join(wrong))
                editor = Editor.from_state(loaded, tok, state, fast=fast)
                if model_id != store.get_memory(name).model_id:
                    log.warning("memory %r was made on %s; serving it on %s (same shapes)", name,
                                store.get_memory(name).model_id, model_id)
                runtime = cls(editor, store, name, model_id, lock, owns_store, keep_checkpoints=keep_checkpoints)
                if policy is not None or checkpoint_every is not None:
                    runtime.configure(policy=policy, checkpoint_every=checkpoint_every)
                return runtime
            cfg = (config or MemoirConfig()).replace(**overrides, module_path=module_path)
            prompts = list(background_prompts) if background_prompts is not None else default_background_prompts()
            editor = Editor.create(loaded, tok, prompts, cfg, fast=fast)
            if readonly:
                log.warning("store %s has no memory %r: serving an empty memory (the base model)", store.location, name)
                return cls(editor, store, name, model_id, None, owns_store, persistent=False)
            store.create_memory(name, editor.state(), model_id, revision,
                                **({"checkpoint_every": checkpoint_every} if checkpoint_every else {}),
                                policy=Policy.from_dict(policy).to_dict())
            return cls(editor, store, name, model_id, lock, owns_store, keep_checkpoints=keep_checkpoints)
        except BaseException:
            if lock is not None:
                lock.release()
            if owns_store:
                store.close()
            raise

    def configure(self, policy: dict[str, Any] | None = None, checkpoint_every: int | None = None) -> None:
        """Change the memory's acceptance policy or checkpoint interval (recorded in the store)."""
        record = self.store.update_memory(self.name, checkpoint_every=checkpoint_every,
                                          policy=Policy.from_dict(policy).to_dict() if policy is not None else None)
        self.policy = Policy.from_dict(record.policy)

    def close(self) -> None:
        """Release the writer lock, and take the memory off the model (which is then the base model again)."""
        if find_memory(self.editor.model) is self.editor.memory:
            detach(self.editor.model, self.editor.memory)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- editing -------------------------------------------------------------------------------
    def apply_request(self, request: dict[str, Any], supersedes: Sequence[int] | None = None) -> dict[str, Any]:
        """Apply one edit request {prompt, target, rephrases?, metadata?, request_id?, name?}.

        `replaces` (a ledger edit id) and `supersedes` (the ledger ids of the edits this one
        replaces; default [`replaces`]) are only recorded here, with a pending job to roll back
        each; `workers.supersede.apply_superseding` resolves them and runs those jobs.

        Idempotent by request id: a request already recorded returns its recorded outcome (a
        pending one is processed). Never raises for a bad request: the outcome says `failed`
        and why. Raises only when this process must stop writing (FencingError) or the ledger
        itself cannot be written."""
        self._require_writer()
        request_id = request.get("request_id") or request.get("id") or uuid.uuid4().hex
        target_name = request.get("name") or request.get("memory") or self.name
        if target_name != self.name:
            return self._refused(request_id, f"the request is for memory {target_name!r}; this runtime serves {self.name!r}")
        try:
            check_bounds(request)  # a message straight from the queue has not met the client's checks
        except RequestError as exc:
            return self._refused(request_id, str(exc))
        try:
            edit, created = self.store.record_request(
                self.name, request_id, request.get("prompt"), request.get("target"),
                request.get("rephrases") or [], request.get("metadata"), replaces=request.get("replaces"),
                supersedes=supersedes)
        except (InvalidRequestError, RequestConflictError) as exc:
            return self._refused(request_id, str(exc))
        if edit.status not in PENDING:
            return self.outcome(edit, duplicate=True)
        return self._process(edit)

    def resume(self) -> list[dict[str, Any]]:
        """Process this memory's queued/applying rows (left by a crash), in sequence order, then
        finish its unfinished jobs (workers/jobs.py: rollbacks, the rollbacks of superseding
        edits). Returns the edits' outcomes."""
        from workers.jobs import resume_jobs

        self._require_writer()
        outcomes = [self._process(edit) for edit in self.store.pending(self.name)]
        resume_jobs(self)
        return outcomes

    def _process(self, edit: EditRecord) -> dict[str, Any]:
        edit = self.store.mark_applying(edit)
        result: EditResult | None = None
        try:
            result = self.editor.train(edit.prompt, edit.target, edit.id)
            self._apply(result, edit.rephrases)
            shortfalls = self.policy.shortfalls(result.scores)
            if shortfalls:
                self.editor.revert(result)
                scores, result = result.scores, None
                return self.outcome(self.store.mark_failed(
                    edit, "refused by the acceptance policy: " + ", ".join(shortfalls), scores=scores))
            edit = self.store.mark_applied(edit, result)
        except FencingError:
            if result is not None and result.edit_id in self.editor.memory.index:
                self.editor.revert(result)
            raise
        except Exception as exc:  # noqa: BLE001 - a bad edit must never stop the runtime
            if result is not None and result.edit_id in self.editor.memory.index:
                self.editor.revert(result)
            log.warning("edit %d (%s) failed: %s", edit.id, edit.request_id, exc)
            return self.outcome(self.store.mark_failed(edit, f"{type(exc).__name__}: {exc}"))
        self._maybe_checkpoint()
        return self.outcome(edit)

    def _apply(self, result: EditResult, rephrases: Sequence[str]) -> None:
        """Add a trained edit to the memory and score it; on any error restore its columns exactly.

        Mirrors Editor.edit: `_before` is the columns' prior content that Editor.revert restores."""
        result._before = self.editor.memory.weight[:, result.mask.to(self.editor.device)].clone()
        self.editor.apply(result)
        try:
            result.scores = self.editor.score_edit(result, rephrases)
        except BaseException:
            self.editor.revert(result)
            raise

    def _maybe_checkpoint(self) -> None:
        try:
            if self.store.checkpoint_due(self.name):
                record = self.store.checkpoint(self.name, self.editor.memory.weight)
                log.info("checkpoint of %r at version %d: %s", self.name, record.version, record.file)
                self.store.prune_checkpoints(self.name, self.keep_checkpoints)
        except FencingError:
            raise
        except Exception as exc:  # noqa: BLE001 - the edit is committed; loading just reads more deltas
            log.error("checkpoint of %r failed (will retry after the next edit): %s", self.name, exc)

    def _require_writer(self) -> None:
        if self.lock is None or not self.persistent:
            raise RuntimeError("this runtime was opened read-only: it cannot apply edits")

    # -- outcomes ------------------------------------------------------------------------------
    @staticmethod
    def outcome(edit: EditRecord, duplicate: bool = False) -> dict[str, Any]:
        """What became of a request: {request_id, edit_id, seq, status, scores, reason, loss, steps, seconds}."""
        return {"request_id": edit.request_id, "edit_id": edit.id, "seq": edit.seq, "status": edit.status,
                "scores": edit.scores, "reason": edit.reason, "loss": edit.loss, "steps": edit.steps,
                "seconds": edit.seconds, "duplicate": duplicate}

    @staticmethod
    def _refused(request_id: Any, reason: str) -> dict[str, Any]:
        """A request that could not be recorded at all (wrong types, id conflict)."""
        return {"request_id": request_id, "edit_id": None, "seq": None, "status": FAILED, "scores": None,
                "reason": reason, "loss": None, "steps": None, "seconds": None, "duplicate": False}

    # -- reading -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_memory: bool = True) -> list[str]:
        """Greedy continuations of `prompts` (batched), with the memory or the base model."""
        return self.editor.generate(list(prompts), max_new_tokens=max_new_tokens, use_memory=use_memory)

    def state(self):
        return self.editor.state()

    def verify(self):
        """The store's checks, plus this process's W_m and index against the ledger."""
        return self.store.verify(self.name, live=self.editor.state())



__all__ = ["Policy", "Runtime", "default_background_prompts", "resolve_model"]
