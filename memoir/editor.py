"""Editor: creates or restores a MEMOIR memory on a model, applies edits, scores them, generates."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from memoir import metrics
from memoir.config import MemoirConfig
from memoir.delta import EditDelta
from memoir.fastpath import FastForward
from memoir.locate import locate, num_layers
from memoir.memory import ResidualMemory, attach, find_memory
from memoir.prompts import (
    InvalidEditError,
    PromptCodec,
    TokenBatch,
    check_text,
    default_prepend_bos,
    generate_context_prefixes,
    make_batch,
)
from memoir.state import MemoryMismatchError, MemoryState, ModelIdentity
from memoir.tophash import PackedMasks, dense_masks, fit_threshold, make_permutation

log = logging.getLogger(__name__)


class EditRefusedError(RuntimeError):
    """The optimisation broke down (non-finite loss or change); the memory is as it was."""


@dataclass
class EditResult:
    """What one edit did: its mask and change to W_m, how it trained, how it scores."""

    edit_id: int
    prompt: str
    target: str
    delta: EditDelta
    losses: list[float]
    steps: int
    seconds: float
    unrelated: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        return self.delta.mask

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


@dataclass
class _Optimised:
    """One edit's optimisation: its columns, G (n, d) and A (n, k) with delta = G·Aᵀ, V, losses."""

    columns: torch.Tensor
    g: torch.Tensor
    acts: torch.Tensor
    values: torch.Tensor
    losses: list[float]
    steps: int


def model_identity(model: nn.Module, site) -> ModelIdentity:
    config = model.config
    return ModelIdentity(
        name_or_path=str(getattr(config, "_name_or_path", "") or type(model).__name__),
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        module_path=site.module_path,
        hidden_size=site.out_features,
        intermediate_size=site.in_features,
        num_layers=site.num_layers,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        revision=getattr(config, "_commit_hash", None),
    )


def _activations(model: nn.Module, memory: ResidualMemory, batch: TokenBatch) -> torch.Tensor:
    """The edited projection's input (B, T, D) for a batch, with the memory off."""
    captured: list[torch.Tensor] = []
    handle = memory.base.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad(), memory.disabled():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


class Editor:
    """One model with its MEMOIR memory attached. Use `create` for a new memory, `from_state` to restore.

    `fast` (default True) trains edits on the fast path (memoir.fastpath) where the architecture
    allows; False always runs the full forward at each step. Both give the same edits."""

    def __init__(self, model: nn.Module, tokenizer, memory: ResidualMemory, state: MemoryState,
                 fast: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.memory = memory
        self.config = state.config
        self.identity = state.model
        self.context_prefixes = list(state.context_prefixes)
        self.background_prompts = list(state.background_prompts)
        self.codec = PromptCodec(tokenizer, state.config.prompt_format, state.prepend_bos)
        self.device = next(model.parameters()).device
        self.fast = fast
        model.requires_grad_(False)
        model.eval()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, model: nn.Module, tokenizer, background_prompts: Sequence[str],
               config: MemoirConfig | None = None, *, fast: bool = True) -> "Editor":
        """A new, empty memory: π from the seed, μ from `background_prompts`, prefixes from the model."""
        if find_memory(model) is not None:
            raise ValueError("this model already has a MEMOIR memory attached")
        config = config or MemoirConfig()
        probe = locate(model, 0, config.module_path)
        config = config.resolve(num_layers(model), probe.in_features)
        prompts = [p for p in background_prompts if isinstance(p, str) and p.strip()][: config.background_size]
        if not prompts:
            raise ValueError("a memory needs background prompts to compute its background mean")
        site = locate(model, config.layer, config.module_path)
        size = site.in_features
        memory = ResidualMemory(model.get_submodule(site.module_path), site, config.top_k, config.threshold or 1.0,
                                make_permutation(size, config.seed), torch.zeros(size))
        attach(model, memory)
        codec = PromptCodec(tokenizer, config.prompt_format, default_prepend_bos(tokenizer))
        with memory.disabled():
            prefixes = generate_context_prefixes(model, codec)
        state = MemoryState(config=config, model=model_identity(model, site), permutation=memory.permutation.cpu(),
                            background=torch.zeros(size), context_prefixes=prefixes,
                            background_prompts=prompts, prepend_bos=codec.prepend_bos,
                            weight=torch.zeros(site.out_features, size))
        editor = cls(model, tokenizer, memory, state, fast=fast)
        memory.background.copy_(editor._background_mean(prompts))
        if config.threshold is None:
            editor._fit_threshold(prompts)
        log.info("new MEMOIR memory at %s: k=%d of %d, threshold %.2f", site.module_path, config.top_k, size, editor.config.threshold)
        return editor

    def _fit_threshold(self, prompts: Sequence[str]) -> None:
        """Set the retrieval threshold from how the background prompts' masks overlap by chance."""
        config = self.config
        fit = fit_threshold(self.masks_of(prompts), config.top_k, config.threshold_capacity,
                            config.threshold_false_retrievals)
        self.config = dataclasses.replace(config, threshold=fit["threshold"], threshold_fit=fit)
        self.memory.threshold = fit["threshold"]

    @classmethod
    def from_state(cls, model: nn.Module, tokenizer, state: MemoryState, *, fast: bool = True) -> "Editor":
        """Attach a saved memory; refuses one made on a different model or layer."""
        if find_memory(model) is not None:
            raise ValueError("this model already has a MEMOIR memory attached")
        site = locate(model, state.config.layer, state.config.module_path)
        problems = state.model.mismatches(model_identity(model, site))
        if problems:
            raise MemoryMismatchError("the memory does not fit this model: " + "; ".join(problems))
        memory = ResidualMemory(model.get_submodule(site.module_path), site, state.config.top_k,
                                state.config.threshold, state.permutation, state.background)
        attach(model, memory)
        memory.weight.copy_(state.weight)
        ids = sorted(state.masks)
        if isinstance(state.masks, PackedMasks):  # packed already (a loaded memory): no unpacking
            memory.index.add_many(ids, state.masks.words_of(ids))
        else:
            for edit_id in ids:
                memory.index.add(edit_id, state.masks[edit_id])
        return cls(model, tokenizer, memory, state, fast=fast)

    def state(self, with_weight: bool = True) -> MemoryState:
        """A snapshot of the memory (W_m copied: later edits do not change it)."""
        return MemoryState(
            config=self.config, model=self.identity, permutation=self.memory.permutation.cpu(),
            background=self.memory.background.cpu(), context_prefixes=self.context_prefixes,
            background_prompts=self.background_prompts, prepend_bos=self.codec.prepend_bos,
            weight=self.memory.weight.cpu().clone() if with_weight else torch.zeros(0),
            masks=self.memory.index.masks(),
        )

    # -- batches ---------------------------------------------------------------------------
    def batch(self, prompts: Sequence[str], targets: Sequence[str] | None = None, left_pad: bool = False) -> TokenBatch:
        targets = targets if targets is not None else [None] * len(prompts)
        pairs = [(self.codec.prompt_ids(p), self.codec.target_ids(p, t) if t else []) for p, t in zip(prompts, targets)]
        return make_batch(pairs, self.codec.pad_id, left_pad=left_pad).to(self.device)

    def _background_mean(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """μ: the mean FFN activation over all the prompt tokens of the background prompts.

        Token-weighted (every token counts once), not the mean of per-prompt means: on zsRE it
        leaves fewer unrelated prompts above the threshold (docs: BENCHMARKS.md, Quality)."""
        total = torch.zeros(self.memory.site.in_features, device=self.device)
        tokens = 0.0
        for start in range(0, len(prompts), batch_size):
            batch = self.batch(prompts[start : start + batch_size])
            acts = _activations(self.model, self.memory, batch).float()
            weights = batch.prompt_mask.float()
            total += torch.einsum("btd,bt->d", acts, weights)
            tokens += float(weights.sum())
        return (total / tokens).cpu()

    def edit_texts(self, prompt: str) -> list[str]:
        """The prompt under the 11 context templates: plain, then each prefix and a space before it."""
        return [prompt] + [f"{prefix} {prompt}" if prefix else prompt for prefix in self.context_prefixes]

    def unrelated_for(self, edit_id: int) -> str:
        """The unrelated sample of an edit: drawn from the background prompts by (seed, edit id)."""
        return random.Random(f"{self.config.seed}:{edit_id}").choice(self.background_prompts)

    def mask_of(self, prompt: str) -> torch.Tensor:
        """The TopHash columns of a prompt (sorted, k of them)."""
        return self._columns_of([prompt])[0]

    def masks_of(self, prompts: Sequence[str]) -> torch.Tensor:
        """The TopHash masks of prompts as (len(prompts), D) 0/1 rows."""
        return dense_masks(self._columns_of(prompts), self.memory.site.in_features)

    def _columns_of(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(prompts), k) sorted TopHash columns, on the CPU."""
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = self.batch(prompts[start : start + batch_size])
            acts = _activations(self.model, self.memory, batch)
            rows.append(self.memory.columns_for(acts, batch.prompt_mask).cpu())
        return torch.cat(rows)

    # -- editing ---------------------------------------------------------------------------
    def train(self, prompt: str, target: str, edit_id: int, unrelated: str | None = None) -> EditResult:
        """Optimise one edit on its own columns and return its delta; W_m itself is not changed."""
        check_text("prompt", prompt)
        check_text("target", target)
        started = time.perf_counter()
        unrelated = unrelated if unrelated is not None else self.unrelated_for(edit_id)
        texts = self.edit_texts(prompt)
        batch = self.batch(texts + [unrelated], [target] * len(texts) + [None])
        if not batch.target_mask.any():
            raise InvalidEditError("the target has no tokens")
        run = self._optimise(batch)
        # V = W_m[:, mask] + delta, on the device: checking V and G spares a d×k product on the host
        if not (torch.isfinite(run.values).all() and torch.isfinite(run.g).all()):
            raise EditRefusedError("the edit's change to the memory is not finite")
        if self.config.weight_decay > 0:
            delta = EditDelta(mask=run.columns, dense_=run.values - self.memory.weight[:, run.columns])
        else:
            nonzero = run.g.abs().sum(-1) > 0
            delta = EditDelta.from_factors(run.columns, run.g[nonzero].T, run.acts[nonzero].T)
        return EditResult(edit_id=edit_id, prompt=prompt, target=target, delta=delta, losses=run.losses,
                          steps=run.steps, seconds=time.perf_counter() - started, unrelated=unrelated)

    def _optimise(self, batch: TokenBatch) -> _Optimised:
        """Choose the edit's columns (from the plain prompt, row 0) and run SGD on them.

        Fast path (`self.fast` and a supported architecture): one captured forward, then only the
        layers after the edited one at each step. Otherwise the full forward at each step."""
        fast = FastForward.build(self.model, self.memory, batch) if self.fast else None
        if fast is not None:
            columns = self.memory.columns_for(fast.acts[:1], fast.batch.prompt_mask[:1])[0]
            acts = fast.use_columns(columns)
            g, values, losses, steps = self._descend(self.memory.weight[:, columns].clone(), fast.forward)
            return _Optimised(columns, g, acts, values, losses, steps)
        acts = _activations(self.model, self.memory, batch)
        columns = self.memory.columns_for(acts[:1], batch.prompt_mask[:1])[0]
        with self.memory.training_branch(columns, self.memory.weight[:, columns].clone()) as branch:

            def forward(_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    use_cache=False).logits
                return metrics.edit_loss(logits, batch), branch.out, branch.acts

            g, values, losses, steps = self._descend(branch.values, forward)
        masked = acts[..., columns].float()
        return _Optimised(columns, g.flatten(0, 1), masked.flatten(0, 1), values, losses, steps)

    def _descend(self, values: torch.Tensor, forward: Callable) -> tuple[torch.Tensor, torch.Tensor, list[float], int]:
        """SGD on V in place (gradient clip, early stop as in the paper).

        `forward(V)` returns (loss, out, acts): the memory's output `out` (a leaf) and the masked
        activations it was made from. Returns G = Σ_t −lr·c_t·∂loss/∂out (shaped like `out`),
        V, the loss before each step and after the last, and the step count."""
        cfg = self.config
        g_sum: torch.Tensor | None = None
        losses: list[float] = []
        for _ in range(cfg.n_iter + 1):
            loss, out, acts = forward(values)
            value = float(loss.detach())  # the one sync per step: the early stop needs it
            if not math.isfinite(value):
                raise EditRefusedError(f"the loss became {value} after {len(losses)} steps; the edit is refused")
            stop = bool(losses) and value <= cfg.stop_loss and abs(losses[-1] - value) <= cfg.stop_delta
            losses.append(value)
            if stop or len(losses) > cfg.n_iter:
                break
            (g,) = torch.autograd.grad(loss, out)
            grad = g.reshape(-1, g.shape[-1]).T @ acts.reshape(-1, acts.shape[-1])
            scale = (cfg.grad_clip / (grad.norm() + 1e-6)).clamp(max=1.0) * -cfg.lr
            if cfg.weight_decay > 0:
                values.mul_(1 - cfg.lr * cfg.weight_decay)
            values.addcmul_(grad, scale)
            g_sum = g * scale if g_sum is None else g_sum.addcmul_(g, scale)
        if g_sum is None:  # the first forward always takes a step (n_iter >= 1); kept for safety
            g_sum = torch.zeros_like(out)
        return g_sum.detach(), values, losses, len(losses) - 1

    def apply(self, result: EditResult) -> None:
        """Add a trained edit to the memory: W_m += delta on its columns; its mask joins the index."""
        self.memory.add_edit(result.edit_id, result.delta)

    def remove(self, edit_id: int, delta: EditDelta) -> None:
        """Take an edit out: W_m -= its delta on its columns; its mask leaves unless still used."""
        self.memory.remove_edit(edit_id, delta)

    def edit(self, prompt: str, target: str, edit_id: int | None = None, rephrases: Sequence[str] = (),
             unrelated: str | None = None, score: bool = True) -> EditResult:
        """Train, apply and score one edit. The caller may `revert` it if its scores are too low."""
        edit_id = edit_id if edit_id is not None else self.next_edit_id()
        result = self.train(prompt, target, edit_id, unrelated)
        result._before = self.memory.weight[:, result.mask.to(self.device)].clone()
        self.apply(result)
        if score:
            result.scores = self.score_edit(result, rephrases)
        log.info("edit %d applied in %.2fs: loss %.4f -> %.4f in %d steps", edit_id, result.seconds,
                 result.losses[0], result.final_loss, result.steps)
        return result

    def revert(self, result: EditResult) -> None:
        """Undo the edit just applied, restoring its columns exactly."""
        cols = result.mask.to(self.device)
        self.memory.index.remove(result.edit_id)
        self.memory.weight[:, cols] = result._before
        self.memory.last = None

    def next_edit_id(self) -> int:
        ids = self.memory.index.edit_ids()
        return max(ids) + 1 if ids else 0

    # -- scoring and generation ------------------------------------------------------------
    def score_edit(self, result: EditResult, rephrases: Sequence[str] = ()) -> dict[str, float]:
        """Rel on its prompt, Gen on its rephrases, self-retrieval, Loc on the check prompts: teacher-forced,
        and the same asked of greedy answers (rel_gen, gen_gen, loc_gen)."""
        rel, retrieved = metrics.accuracy(self, [result.prompt], [result.target], with_retrieval=True)
        scores = {"rel": rel[0], "retrieved": float(result.edit_id in retrieved[0])}
        scores["rel_gen"] = metrics.answers_with_target(self, [result.prompt], [result.target])[0]
        if rephrases:
            gen, _ = metrics.accuracy(self, list(rephrases), [result.target] * len(rephrases))
            scores["gen"] = sum(gen) / len(gen)
            gen_gen = metrics.answers_with_target(self, list(rephrases), [result.target] * len(rephrases))
            scores["gen_gen"] = sum(gen_gen) / len(gen_gen)
        checks = self.background_prompts[: self.config.check_size]
        scores["loc"] = sum(metrics.locality(self, checks)) / len(checks)
        scores["loc_gen"] = sum(metrics.generation_unchanged(self, checks)) / len(checks)
        return scores

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int = 16, use_memory: bool = True,
                     use_cache: bool = True) -> list[list[int]]:
        """Greedy continuations as token ids, up to and including an end-of-sequence token, batched;
        retrieval is decided per sequence at prefill."""
        batch = self.batch(prompts, left_pad=True)
        previous = self.memory.enabled
        self.memory.enabled = use_memory
        try:
            out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                      pad_token_id=self.codec.pad_id)
        finally:
            self.memory.enabled = previous
        stops = self.stop_ids()
        rows = []
        for row in out[:, batch.input_ids.shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            rows.append(row[:end])
        return rows

    def stop_ids(self) -> set[int]:
        """The tokens that end an answer: the model's end-of-sequence ids and the tokenizer's."""
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return stops

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_memory: bool = True,
                 use_cache: bool = True) -> list[str]:
        """Greedy continuations as text, batched; retrieval is decided per sequence at prefill."""
        return [self.decode(ids) for ids in self.generate_ids(prompts, max_new_tokens, use_memory, use_cache)]
