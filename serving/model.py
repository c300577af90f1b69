"""Serving the edited model: `load(...)` gives a Hugging Face model with its memory attached,
pinned to a ledger sequence number or following the store.

    from serving import load
    served = load("builtin", store="./memoir-store", name="default")   # newest; at_seq=S pins
    served.model, served.tokenizer       # a transformers model, the memory inside; its tokenizer
    served.seq, served.version           # the snapshot it serves (store.snapshots explains both)
    served.generate(["Who wrote Hamlet?"])
    served.refresh()                     # between requests: swap in what the ledger has now

Prompts are formatted as at edit time (`served.prompt_ids`, `served.chat_ids`: plain or the
chat template, BOS as recorded with the memory).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from memoir import Editor, MemoryState, detach
from memoir.prompts import TokenBatch, make_batch
from memoir.sources import load_model, torch_dtype
from store import DEFAULT_STORE, Store, StoreError
from store.snapshots import Snapshot, ledger_mark, load_snapshot

log = logging.getLogger(__name__)


Loaded = tuple[Snapshot, MemoryState]


class ServedModel:
    """A model with a memory attached, and the snapshot of the ledger it serves. Use `load`."""

    def __init__(self, editor: Editor, store: Store, snapshot: Snapshot, model_id: str, at_seq: int | None,
                 owns_store: bool) -> None:
        self.editor = editor
        self.store = store
        self.snapshot = snapshot
        self.model_id = model_id
        self.at_seq = at_seq
        self._owns_store = owns_store

    # -- what is served ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The transformers model; its edited projection carries the memory."""
        return self.editor.model

    @property
    def tokenizer(self) -> Any:
        return self.editor.tokenizer

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def seq(self) -> int:
        """The ledger sequence number served: the newest settled one, or the pinned one."""
        return self.snapshot.seq

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def pinned(self) -> bool:
        """Pinned to `at_seq`: never moves."""
        return self.at_seq is not None

    def describe(self) -> dict[str, Any]:
        """The snapshot (seq, version, live edits), the memory's config and the model, as JSON data."""
        return {**self.snapshot.to_dict(), "pinned": self.pinned, "at_seq": self.at_seq, "model": self.model_id,
                "config": self.editor.config.to_dict(), "store": self.store.location}

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's token ids, formatted as at edit time."""
        return self.editor.codec.prompt_ids(prompt)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A conversation's token ids. A single user turn is formatted exactly as an edit prompt;
        longer ones go through the chat template (chat memories) or have their contents joined
        by newlines (plain memories, edited on bare prompts)."""
        codec = self.editor.codec
        if len(messages) == 1 and messages[0]["role"] == "user":
            return codec.prompt_ids(messages[0]["content"])
        if codec.prompt_format == "chat":
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return codec.prompt_ids("\n".join(m["content"] for m in messages))

    def batch(self, ids: Sequence[list[int]]) -> TokenBatch:
        """Left-padded batch of prompts (token ids) on the model's device, ready for `model.generate`."""
        return make_batch([(list(row), []) for row in ids], self.editor.codec.pad_id, left_pad=True).to(
            self.editor.device)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_memory: bool = True) -> list[str]:
        """Greedy continuations (batched; retrieval decided per sequence)."""
        return self.editor.generate(list(prompts), max_new_tokens=max_new_tokens, use_memory=use_memory)

    # -- following the ledger ------------------------------------------------------------------
    def fetch(self, known: tuple[int, int] | None = None) -> Loaded | None:
        """The newest snapshot from the store if it differs from `known` (default: the one served);
        None when pinned or unchanged. Reads only: safe beside a running generation."""
        if self.pinned:
            return None
        if ledger_mark(self.store, self.name) == (known or self.snapshot.mark):
            return None
        return load_snapshot(self.store, self.name, expect=self.editor.identity)

    def install(self, snapshot: Snapshot, state: MemoryState) -> None:
        """Serve `state` from now on (call between generations, never during one)."""
        if self.pinned and snapshot.mark != self.snapshot.mark:
            raise RuntimeError(f"this model is pinned to seq {self.at_seq}; it does not move")
        old = self.editor.memory
        detach(self.model, old)
        try:
            editor = Editor.from_state(self.model, self.tokenizer, state, fast=self.editor.fast)
        except BaseException:
            from memoir import attach

            attach(self.model, old)
            raise
        self.editor, self.snapshot = editor, snapshot
        log.info("serving memory %r at seq %d, version %d (%d live edits)", snapshot.name, snapshot.seq,
                 snapshot.version, len(snapshot.edits))

    def refresh(self) -> bool:
        """Swap in the ledger's newest snapshot if it moved; True if it did (False when pinned)."""
        loaded = self.fetch()
        if loaded is None:
            return False
        self.install(*loaded)
        return True

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "ServedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(model: str | os.PathLike | torch.nn.Module, store: Store | str | os.PathLike | None = None,
         name: str = "default", at_seq: int | None = None, device: str = "cpu",
         dtype: str | torch.dtype | None = None, *, tokenizer: Any = None,
         tensor_dir: str | os.PathLike | None = None) -> ServedModel:
    """Load `model` (a `--model` value, see memoir.sources, or a model object with `tokenizer`) and attach
    memory `name` from `store` as it stands, or as it stood at ledger seq `at_seq` (pinned).

    Read-only: takes no writer lock. Raises UnknownMemoryError for a memory the store lacks,
    StoreError for a seq the ledger has not settled, MemoryMismatchError for another model's memory."""
    owns_store = not isinstance(store, Store)
    if owns_store:
        target = str(store or os.environ.get("MEMOIR_STORE") or DEFAULT_STORE)
        if "://" not in target and not os.path.isdir(target):
            raise StoreError(f"no store at {target}")  # reading creates nothing
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer")
        model_id = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        loaded, tok = model.to(device), tokenizer
    else:
        model_id = str(model)
        loaded, tok, _ = load_model(model, dtype=torch_dtype(dtype), device=device)  # a bad model touches no store
    if owns_store:
        store = Store.open(target, tensor_dir)
    try:
        stored = store.get_memory(name)
        snapshot, state = load_snapshot(store, name, at_seq)
        editor = Editor.from_state(loaded, tok, state)
        if model_id != stored.model_id:
            log.warning("memory %r was made on %s; serving it on %s (same shapes)", name, stored.model_id, model_id)
        return ServedModel(editor, store, snapshot, model_id, at_seq, owns_store)
    except BaseException:
        if owns_store:
            store.close()
        raise


__all__ = ["Loaded", "ServedModel", "load"]
