"""Scoring edits on their own prompts, from cached activations (used by rollbacks).

The edited layer's inputs for live edits' own prompts (teacher-forced, prompt + target) are
captured once per process (`ActivationCache`, memory off: nothing upstream of the layer depends
on W_m), so a rollback scores hundreds of edits — which of their target tokens the memory as it
stands predicts right, with retrieval as at inference — running only the layers after the edited
one (memoir.fastpath); other architectures score with batched full forwards. `warm` captures
the live edits' activations when a worker starts, when there are few (restarts stay fast).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence
from weakref import WeakKeyDictionary

import torch

from memoir import Editor, metrics
from memoir.fastpath import FastForward
from memoir.prompts import TokenBatch
from memoir.tophash import MaskIndex
from store import EditRecord, Store

if TYPE_CHECKING:
    from workers.runtime import Runtime

GROUP_SIZE = 64  # prompts captured per forward by the activation cache
WARM_EDITS = 256  # a starting worker captures every live edit when there are at most this many (`warm`)


@dataclass
class _Group:
    """Some edits' prompts + targets, teacher-forced, captured at the edited layer (memory off)."""

    ids: list[int]
    batch: TokenBatch
    fast: FastForward | None  # None: the architecture has no fast path; score with full forwards
    queries: torch.Tensor | None = None  # (B, W) packed prompt masks, what retrieval compares
    rows: torch.Tensor | None = None  # row of each target position of `fast`


class ActivationCache:
    """The edited layer's inputs for live edits' own prompts, captured once per process.

    They do not depend on W_m, so after the first capture a rollback scores hundreds of edits
    with only the layers after the edited one (none at all for the last layer: norm + head at
    the target positions)."""

    def __init__(self, editor: Editor, group_size: int = GROUP_SIZE) -> None:
        self.editor = editor
        self.group_size = group_size
        self.groups: list[_Group] = []
        self.group_of: dict[int, int] = {}

    def ensure(self, edits: Sequence[EditRecord]) -> int:
        """Capture the edits not cached yet (batched); returns how many were captured."""
        missing = [e for e in edits if e.id not in self.group_of]
        self._add(missing)
        return len(missing)

    def ensure_ids(self, store: Store, name: str, ids: Sequence[int]) -> int:
        """`ensure` for live edits given by id (their rows are read only when some are missing)."""
        missing = {i for i in ids if i not in self.group_of}
        if missing:
            self._add([e for e in store.applied(name) if e.id in missing])
        return len(missing)

    def _add(self, missing: Sequence[EditRecord]) -> None:
        for start in range(0, len(missing), self.group_size):
            chunk = missing[start : start + self.group_size]
            self.groups.append(self._capture(chunk))
            for edit in chunk:
                self.group_of[edit.id] = len(self.groups) - 1

    @torch.no_grad()
    def _capture(self, edits: Sequence[EditRecord]) -> _Group:
        editor, memory = self.editor, self.editor.memory
        batch = editor.batch([e.prompt for e in edits], [e.target for e in edits])
        fast = FastForward.build(editor.model, memory, batch) if editor.fast else None
        group = _Group([e.id for e in edits], batch, fast)
        if fast is not None:
            columns = memory.columns_for(fast.acts, fast.batch.prompt_mask)
            group.queries = memory.index.pack(columns)
            group.rows = fast.targets // fast.batch.target_mask.shape[1]
        return group

    def score(self, ids: Sequence[int], index: MaskIndex, without: int | None = None) -> dict[int, torch.Tensor]:
        """For each edit: which of its target tokens the memory as it stands (W_m) with `index`
        (less edit `without`, as if it had left the index) predicts right on its own prompt
        (bool per target token). `ids` must be cached."""
        out: dict[int, torch.Tensor] = {}
        wanted = set(ids)
        for number in sorted({self.group_of[i] for i in ids}):
            group = self.groups[number]
            rows = [row for row, edit_id in enumerate(group.ids) if edit_id in wanted]
            if group.fast is not None:
                correct = self._fast_correct(group, index, without, rows)
            else:
                correct = self._full_correct(group, index, without)
            for row in rows:
                out[group.ids[row]] = correct[row]
        return out

    def _retrieved(self, group: _Group, index: MaskIndex, without: int | None) -> torch.Tensor:
        """(B, D) the mask each prompt retrieves (MaskIndex.best, threshold), zero rows where the
        memory is off; the row of `without` is skipped unless another live edit shares it."""
        memory = self.editor.memory
        if len(index) == 0:
            return torch.zeros(group.queries.shape[0], index.size, device=index.device)
        exclude = None
        if without is not None and without in index and index.edits(index.row_of(without)) == {without}:
            exclude = index.row_of(without)
        rows, ratios = index.best_words(group.queries, exclude=exclude)
        return index.dense_rows(rows) * (ratios >= memory.threshold).unsqueeze(1)

    @torch.no_grad()
    def _fast_correct(self, group: _Group, index: MaskIndex, without: int | None,
                      rows: list[int]) -> dict[int, torch.Tensor]:
        """Retrieval and the memory's output at the edited layer, then only the later layers
        (with none, only the target positions of the `rows` asked for)."""
        memory, fast = self.editor.memory, group.fast
        masks = self._retrieved(group, index, without).to(memory.weight.device)
        acts = fast.acts.reshape(-1, fast.acts.shape[-1])
        if fast.live is None:  # later blocks: every position of every row
            width = fast.batch.target_mask.shape[1]
            added = (acts.float() * masks.repeat_interleave(width, dim=0)) @ memory.weight.T
            hidden = (fast.base.float() + added).to(fast.base.dtype).view(fast.shape)
            for block, (args, kwargs) in zip(fast.later, fast.block_inputs):
                output = block(hidden, *args, **kwargs)
                hidden = output[0] if isinstance(output, tuple) else output
            hidden, labels, owner = hidden.reshape(-1, hidden.shape[-1])[fast.targets], fast.labels, group.rows
        else:  # the target positions of the rows asked for
            keep = torch.isin(group.rows, torch.tensor(rows, device=group.rows.device))
            owner = group.rows[keep]
            added = (acts[fast.live[keep]].float() * masks[owner]) @ memory.weight.T
            hidden = (fast.base[keep].float() + added).to(fast.base.dtype)
            labels = fast.labels[keep]
        right = fast.head(fast.norm(hidden)).argmax(-1) == labels
        pieces = right.split(torch.bincount(owner, minlength=len(group.ids)).tolist())  # owner is sorted
        return {row: pieces[row] for row in rows}

    def _full_correct(self, group: _Group, index: MaskIndex, without: int | None) -> dict[int, torch.Tensor]:
        """Batched full forwards with the memory (other architectures)."""
        memory = self.editor.memory
        if without is not None and without in index:
            index = copy.deepcopy(index)
            index.remove(without)
        live, memory.index, memory.last = memory.index, index, None
        try:
            predicted = metrics._argmax(self.editor, group.batch)
        finally:
            memory.index, memory.last = live, None
        right = (predicted == group.batch.labels) & group.batch.target_mask
        return {row: right[row][group.batch.target_mask[row]] for row in range(len(group.ids))}


_caches: "WeakKeyDictionary[Editor, ActivationCache]" = WeakKeyDictionary()


def activation_cache(editor: Editor) -> ActivationCache:
    """The process-wide activation cache of an editor (kept as long as the editor lives)."""
    cache = _caches.get(editor)
    if cache is None:
        cache = _caches[editor] = ActivationCache(editor)
    return cache


def warm(runtime: "Runtime", limit: int | None = WARM_EDITS) -> int:
    """Capture the activations of every live edit now, e.g. when a worker starts, so that the first
    rollback pays only for scoring, unless there are more than `limit` (None: no limit); returns how
    many were captured.

    Bounded because a capture costs a forward pass per 64 edits and ~1.6 MB of memory an edit on
    SmolLM2 (BENCHMARKS.md, Scale): at 10 000 edits minutes and ~16 GB before the worker could take
    its first request. Above the limit nothing is captured at start: a rollback then needs nearly
    every live edit anyway (at k/D ≈ 0.29 each shares a column with any other) and captures what
    it lacks (`ActivationCache.ensure_ids`)."""
    if limit is not None and runtime.editor.memory.index.edit_count > limit:
        return 0  # counted in the live index: a start with many edits reads no ledger rows for this
    ids = list(runtime.store.applied_masks(runtime.name))
    return activation_cache(runtime.editor).ensure_ids(runtime.store, runtime.name, ids)


__all__ = ["GROUP_SIZE", "WARM_EDITS", "ActivationCache", "activation_cache", "warm"]
