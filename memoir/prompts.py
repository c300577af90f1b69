"""How text becomes token batches: prompt format, BOS, targets, padding, and the context prefixes.

Prompts and targets are data: they are tokenized, never used as format strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
CONTEXT_LENGTHS = (5, 10)  # 5 prefixes of 5 generated tokens, 5 of 10


class InvalidEditError(ValueError):
    """An edit request that cannot be applied (empty prompt or target, too long, not text)."""


@dataclass(frozen=True)
class PromptCodec:
    """Turns prompts and targets into token ids the same way at edit time and at inference."""

    tokenizer: object
    prompt_format: str = "plain"  # "plain" or "chat" (the tokenizer's chat template)
    prepend_bos: bool = False

    def _text(self, prompt: str) -> str:
        if self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        return prompt

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self._encode(self._text(prompt))
        if self.prepend_bos and self.prompt_format == "plain":  # a chat template places its own BOS
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def target_ids(self, prompt: str, target: str) -> list[int]:
        """The target's ids as the model reads them after the prompt (as EasyEdit computes them):
        those of `prompt + " " + target` (a chat reply follows its template directly) after the
        prompt's own ids. Tokenised alone, a target would begin with a word-start token that a
        SentencePiece tokenizer never produces after the prompt. Where the joined text does not
        split at the prompt's end, the target is tokenised on its own."""
        text = self._text(prompt)
        joined = target if self.prompt_format == "chat" else " " + target
        head, whole = self._encode(text), self._encode(text + joined)
        if whole[: len(head)] == head and len(whole) > len(head):
            return whole[len(head) :]
        return self._encode(joined)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


def default_prepend_bos(tokenizer) -> bool:
    """Follow the tokenizer's own convention: BOS in front of a prompt when it adds one itself.

    The codec always tokenizes without special tokens and adds BOS explicitly, so that the
    prompt's extent is exact and the choice is recorded with the memory.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def check_text(name: str, value: object, max_chars: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidEditError(f"{name} must be text, got {type(value).__name__}")
    if not value.strip():
        raise InvalidEditError(f"{name} is empty")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidEditError(f"{name} is {len(value)} characters long; the limit is {max_chars}")
    return value


@dataclass
class TokenBatch:
    """A padded batch. `prompt_mask` marks prompt tokens; `target_mask` marks the positions whose
    next-token prediction is a target token, and `labels` holds that token (else -100)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    target_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_mask, self.target_mask, self.labels)))


def make_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, left_pad: bool = False) -> TokenBatch:
    """Pad (prompt ids, target ids) pairs into one batch; targets may be empty (no loss)."""
    width = max(len(p) + len(t) for p, t in pairs)
    size = (len(pairs), width)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention = torch.zeros(size, dtype=torch.bool)
    prompt = torch.zeros(size, dtype=torch.bool)
    target = torch.zeros(size, dtype=torch.bool)
    labels = torch.full(size, -100, dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        n = len(p) + len(t)
        start = width - n if left_pad else 0
        input_ids[row, start : start + n] = torch.tensor(p + t, dtype=torch.long)
        attention[row, start : start + n] = True
        prompt[row, start : start + len(p)] = True
        if t:
            # the prediction of target token j is made at the position before it
            first = start + len(p) - 1
            target[row, first : first + len(t)] = True
            labels[row, first : first + len(t)] = torch.tensor(t, dtype=torch.long)
    return TokenBatch(input_ids, attention, prompt, target, labels)


def clean_prefix(text: str) -> str:
    """A generated context prefix, made safe to stand before any prompt."""
    return text.replace("{", " ").replace("}", " ").strip()


@torch.no_grad()
def generate_context_prefixes(model, codec: PromptCodec) -> list[str]:
    """The 10 context prefixes of MEMOIR/ROME: greedy continuations of 5 seeds, 5 and 10 tokens long.

    Call with the memory off: they describe the base model.
    """
    tokenizer = codec.tokenizer
    device = next(model.parameters()).device
    prefixes = []
    for length in CONTEXT_LENGTHS:
        for seed in CONTEXT_SEEDS:
            ids = tokenizer(seed, add_special_tokens=False)["input_ids"]
            if codec.prepend_bos:
                ids = [tokenizer.bos_token_id] + ids
            input_ids = torch.tensor([ids], device=device)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=length,
                do_sample=False,
                pad_token_id=codec.pad_id,
            )
            new = out[0, len(ids) :].tolist()
            prefixes.append(clean_prefix(seed + tokenizer.decode(new, skip_special_tokens=True)))
    return prefixes
