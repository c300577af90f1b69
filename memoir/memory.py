"""ResidualMemory: MEMOIR's zero-initialised memory W_m beside one FFN output projection.

    output = W a + W_m (M ⊙ a)

where M is the stored mask of the edit that the sequence's own prompt retrieves (overlap
ratio ≥ threshold), or nothing at all: then the output is the base projection's, bit for bit.
The decision is taken once per sequence at prefill and holds for the tokens generated later.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from memoir.locate import ProjectionSite
from memoir.tophash import MaskIndex, prompt_features, topk_columns


@dataclass
class Retrieval:
    """The decision for each sequence of the last prefill: index row (-1 = memory off) and overlap ratio.

    Everything the decoding steps need is worked out here once: which sequences use the memory
    (`on`, and how many) and their masks, so a step does no lookups and no host syncs."""

    rows: torch.Tensor
    ratios: torch.Tensor
    masks: torch.Tensor  # (B, D) 0/1, zero rows where the memory is off
    on: torch.Tensor  # (n,) the sequences that use the memory
    on_masks: torch.Tensor  # (n, D) their masks

    @property
    def active(self) -> torch.Tensor:
        return self.rows >= 0

    @property
    def count(self) -> int:
        return self.on.shape[0]


class _TrainingBranch:
    """While an edit is optimised: every sequence uses the edit's columns, and V = W_m[:, cols] is live."""

    def __init__(self, columns: torch.Tensor, values: torch.Tensor) -> None:
        self.columns = columns
        self.values = values  # (d, k) fp32, updated in place by the editor
        self.acts: torch.Tensor | None = None  # (B, T, k) fp32 masked activations of the last forward
        self.out: torch.Tensor | None = None  # (B, T, d) memory output of the last forward (a leaf)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.acts = x[..., self.columns].float()
        self.out = (self.acts @ self.values.T).requires_grad_(True)
        return self.out


class ResidualMemory(nn.Module):
    """Wraps the original projection (nn.Linear, or GPT-2's transposed Conv1D) of one layer."""

    def __init__(
        self,
        base: nn.Module,
        site: ProjectionSite,
        top_k: int,
        threshold: float,
        permutation: torch.Tensor,
        background: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base = base
        self.site = site
        self.top_k = top_k
        self.threshold = threshold
        device = next(base.parameters()).device
        d, size = site.out_features, site.in_features
        if permutation.shape != (size,) or background.shape != (size,):
            raise ValueError(f"permutation and background must have {size} entries")
        self.register_buffer("weight", torch.zeros(d, size, dtype=torch.float32, device=device))
        self.register_buffer("permutation", permutation.to(device=device, dtype=torch.long))
        self.register_buffer("background", background.to(device=device, dtype=torch.float32))
        self.index = MaskIndex(size, top_k, device)
        self.enabled = True
        self.last: Retrieval | None = None
        self._prompt_mask: torch.Tensor | None = None
        self._prompt_override: torch.Tensor | None = None
        self._hold = False
        self._training: _TrainingBranch | None = None

    # -- prompt extent and decisions ------------------------------------------------------------
    def new_prompt(self, attention_mask: torch.Tensor | None) -> None:
        """Called at each prefill: the next forward decides again, from these prompt positions
        (unless a decision is held, see `decision_held`)."""
        if self._hold and self.last is not None:
            return
        self.last = None
        self._prompt_mask = self._prompt_override if self._prompt_override is not None else attention_mask

    @contextlib.contextmanager
    def prompt_extent(self, prompt_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, prefills take their prompt positions from `prompt_mask` (B, T),
        e.g. to leave the target tokens out of a teacher-forced input."""
        previous = self._prompt_override
        self._prompt_override = prompt_mask
        try:
            yield
        finally:
            self._prompt_override = previous

    @contextlib.contextmanager
    def decision_held(self) -> Iterator[None]:
        """Within the block, the first prefill decides and every later forward keeps that decision.

        Generation without a KV cache re-runs the whole sequence at each step, so each step looks
        like a prefill; the tokens it generated must not change which edit the prompt retrieved."""
        previous = self._hold
        self._hold, self.last = True, None
        try:
            yield
        finally:
            self._hold = previous

    def columns_for(self, acts: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """TopHash columns (B, k) of each sequence, from its activations at this layer."""
        features = prompt_features(acts, prompt_mask, self.background)
        return topk_columns(features, self.top_k, self.permutation)

    def decide(self, acts: torch.Tensor, prompt_mask: torch.Tensor | None) -> Retrieval:
        if prompt_mask is not None and prompt_mask.shape != acts.shape[:2]:
            prompt_mask = None  # a mask for another input (e.g. no hook saw this call): use every position
        rows, ratios = self.index.best_columns(self.columns_for(acts, prompt_mask))
        rows = torch.where(ratios >= self.threshold, rows, torch.full_like(rows, -1))
        on = (rows >= 0).nonzero().flatten()
        on_masks = self.index.dense_rows(rows[on]).to(acts.device)  # only the retrieved masks, unpacked
        masks = torch.zeros(acts.shape[0], self.site.in_features, device=acts.device).index_copy_(0, on.to(acts.device), on_masks)
        return Retrieval(rows=rows, ratios=ratios, masks=masks, on=on.to(acts.device), on_masks=on_masks)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._training is not None:
            return (out.float() + self._training(x)).to(out.dtype)
        if not self.enabled or len(self.index) == 0:
            return out
        if self.last is None or self.last.rows.shape[0] != x.shape[0]:
            self.last = self.decide(x, self._prompt_mask)
        last = self.last
        if last.count == 0:
            return out
        if last.count == x.shape[0]:  # every sequence retrieved an edit
            return self._mix(out, x, last.masks)
        on = last.on
        mixed = self._mix(out.index_select(0, on), x.index_select(0, on), last.on_masks)
        return out.index_copy(0, on, mixed)

    def _mix(self, out: torch.Tensor, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """out + W_m (M ⊙ x) for (n, T, ·) rows and their (n, D) masks, in fp32, one fused product."""
        n, t, d = out.shape
        masked = (x.float() * masks.unsqueeze(1)).view(n * t, -1)
        return torch.addmm(out.float().reshape(n * t, d), masked, self.weight.T).view(n, t, d).to(out.dtype)

    @contextlib.contextmanager
    def training_branch(self, columns: torch.Tensor, values: torch.Tensor) -> Iterator[_TrainingBranch]:
        """Within the block every forward uses `columns` with W_m[:, columns] = `values` (d × k)."""
        self._training = _TrainingBranch(columns.to(self.weight.device), values)
        try:
            yield self._training
        finally:
            self._training = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model, exactly, within the block."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    # -- edits ---------------------------------------------------------------------------------
    def retrieved_edits(self) -> list[list[int]]:
        """For the last prefill: the live edits whose mask each sequence retrieved ([] = memory off)."""
        if self.last is None:
            return []
        return [sorted(self.index.edits(int(r))) if r >= 0 else [] for r in self.last.rows.tolist()]

    def add_edit(self, edit_id: int, delta) -> None:
        """W_m += the edit's delta on its own columns, and its mask joins the index."""
        delta.apply_to(self.weight, 1.0)
        self.index.add(edit_id, delta.mask)
        self.last = None

    def remove_edit(self, edit_id: int, delta) -> None:
        """W_m -= the edit's delta on its own columns; its mask leaves the index unless still used."""
        delta.apply_to(self.weight, -1.0)
        self.index.remove(edit_id)
        self.last = None


def _past_length(kwargs: dict, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> int:
    """How many tokens the model has already seen for this call: > 0 on a decoding step.

    Read from whatever the model calls its KV cache (`past_key_values`, transformers 5's `cache`,
    a legacy tuple), else from an attention mask longer than the input: a decoding step is never
    mistaken for a new prompt because of how one version of transformers names an argument."""
    for value in kwargs.values():
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length())
    legacy = kwargs.get("past_key_values")
    if isinstance(legacy, (tuple, list)) and legacy and legacy[0] is not None:
        return int(legacy[0][0].shape[-2])
    if input_ids is not None and attention_mask is not None and attention_mask.ndim == 2:
        return max(0, attention_mask.shape[1] - input_ids.shape[1])  # ids (B, T) or embeddings (B, T, H)
    return 0


def _prefill_hook(memory: ResidualMemory):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        if _past_length(kwargs, ids, mask) == 0:
            memory.new_prompt(mask.bool() if mask is not None else None)
        return None

    return hook


def _deciding_once(generate: Callable, memory: ResidualMemory) -> Callable:
    """`model.generate` with the retrieval decision taken at its prefill and held to the end, so
    generating with or without a KV cache (where each step re-reads the whole sequence) gives
    the same decision from the same prompt."""

    @functools.wraps(generate)
    def generate_held(*args, **kwargs):
        with memory.decision_held():
            return generate(*args, **kwargs)

    return generate_held


def attach(model: nn.Module, memory: ResidualMemory) -> ResidualMemory:
    """Put `memory` in place of its projection inside `model` (the base weights stay untouched).

    Every way of running the model decides retrieval the same way: a pre-forward hook marks each
    new prompt, and `model.generate` holds the prompt's decision for all the tokens it generates."""
    parent_path, _, name = memory.site.module_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if getattr(parent, name) is not memory.base:
        raise ValueError(f"{memory.site.module_path} is not the module this memory wraps")
    setattr(parent, name, memory)
    memory._hook = model.register_forward_pre_hook(_prefill_hook(memory), with_kwargs=True)
    if callable(getattr(model, "generate", None)):
        model.generate = _deciding_once(model.generate, memory)
    return memory


def detach(model: nn.Module, memory: ResidualMemory) -> nn.Module:
    """Restore the original projection; returns it."""
    parent_path, _, name = memory.site.module_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, memory.base)
    memory._hook.remove()
    vars(model).pop("generate", None)  # back to the class's own generate
    return memory.base


def find_memory(model: nn.Module) -> ResidualMemory | None:
    for module in model.modules():
        if isinstance(module, ResidualMemory):
            return module
    return None
