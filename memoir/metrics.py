"""The edit loss, the field's teacher-forced scores (EasyEdit's Rel, Gen, Loc), and the same
questions asked of generated answers, as a user reads them (rel_gen, gen_gen, loc_gen)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from memoir.prompts import TokenBatch

if TYPE_CHECKING:
    from memoir.editor import Editor


def edit_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Cross-entropy on target tokens only, averaged per sample, then over the samples with a target."""
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    counts = batch.target_mask.sum(dim=1)
    has_target = counts > 0
    per_sample = token_loss.sum(dim=1)[has_target] / counts[has_target]
    return per_sample.mean()


def _argmax(editor: "Editor", batch: TokenBatch) -> torch.Tensor:
    with torch.no_grad(), editor.memory.prompt_extent(batch.prompt_mask):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits.argmax(dim=-1)


def accuracy(editor: "Editor", prompts: Sequence[str], targets: Sequence[str], with_retrieval: bool = False,
             batch_size: int = 32) -> tuple[list[float], list[list[int]]]:
    """Per prompt: share of target tokens predicted right, teacher-forced (Rel, Gen);
    and the edits each prompt retrieved (when asked)."""
    scores: list[float] = []
    retrieved: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = editor.batch(prompts[start : start + batch_size], targets[start : start + batch_size])
        predicted = _argmax(editor, batch)
        right = (predicted == batch.labels) & batch.target_mask
        scores += (right.sum(1) / batch.target_mask.sum(1).clamp_min(1)).tolist()
        if with_retrieval:
            found = editor.memory.retrieved_edits()
            retrieved += found if found else [[] for _ in range(batch.input_ids.shape[0])]
    return scores, retrieved


def locality(editor: "Editor", prompts: Sequence[str], answers: Sequence[str] | None = None,
             batch_size: int = 32) -> list[float]:
    """Per prompt: share of scored positions whose argmax is the unedited model's.

    With answers, the positions that predict the answer (teacher-forced), as in EasyEdit;
    without, every prompt position.
    """
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = editor.batch(chunk, answers[start : start + batch_size] if answers else None)
        scored = batch.target_mask if answers else batch.prompt_mask
        edited = _argmax(editor, batch)
        with editor.memory.disabled():
            base = _argmax(editor, batch)
        same = (edited == base) & scored
        scores += (same.sum(1) / scored.sum(1).clamp_min(1)).tolist()
    return scores


ANSWER_SLACK_TOKENS = 3  # a generated answer may run this many tokens past the target's length
UNCHANGED_TOKENS = 8  # an unrelated prompt is untouched when this many generated tokens are the base model's


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def answers_with_target(editor: "Editor", prompts: Sequence[str], targets: Sequence[str],
                        slack: int = ANSWER_SLACK_TOKENS, batch_size: int = 32) -> list[float]:
    """Per prompt: 1.0 when its greedy answer, at most the target's length + `slack` tokens, begins
    with the target (whitespace and case normalised), else 0.0 (rel_gen, gen_gen)."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk, wanted = prompts[start : start + batch_size], targets[start : start + batch_size]
        budgets = [len(editor.codec.target_ids(p, t)) + slack for p, t in zip(chunk, wanted)]
        rows = editor.generate_ids(chunk, max_new_tokens=max(budgets))
        for row, budget, target in zip(rows, budgets, wanted):
            scores.append(float(normalised(editor.decode(row[:budget])).startswith(normalised(target))))
    return scores


def generation_unchanged(editor: "Editor", prompts: Sequence[str], tokens: int = UNCHANGED_TOKENS,
                         batch_size: int = 32) -> list[float]:
    """Per prompt: 1.0 when its first `tokens` greedy tokens are the unedited model's, else 0.0 (loc_gen)."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        edited = editor.generate_ids(chunk, max_new_tokens=tokens)
        base = editor.generate_ids(chunk, max_new_tokens=tokens, use_memory=False)
        scores += [float(a == b) for a, b in zip(edited, base)]
    return scores
