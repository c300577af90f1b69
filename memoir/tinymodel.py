"""Tiny models built from configs, and the built-in tiny trained Llama.

Nothing here downloads anything. The zsRE dev file shipped in `memoir/data` is the only data:

- `train_tokenizer` trains a byte-level BPE on its text;
- `build_model` makes a randomly initialised causal LM of any supported architecture;
- `train_qa_model` trains a 4-layer, 128-wide Llama to memorise its question -> answer lines;
- `builtin_model_path` trains that model once per machine and caches it (demo, tests, benchmarks).

Tokenizer convention (same as Llama's): the tokenizer adds `<s>` (BOS) in front of every
encoded text and never adds `</s>`. Training lines are `<s> question answer </s>`, so
`tokenizer(prompt)` gives exactly the context the model was trained on, and
`decode(..., skip_special_tokens=True)` drops the BOS again. The rule is the post-processor in
tokenizer.json, so it survives save/load. (transformers 5 does not persist the `add_bos_token`
attribute of a generic fast tokenizer, which reads False here: test `tokenizer("x").input_ids[0]`.)
The chat template renders the same format: a user message becomes `<s>question`, and the model
continues with ` answer</s>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from memoir.cache import build_once, cache_root

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
ZSRE_FILE = DATA_DIR / "zsre_dev.jsonl"

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gptj", "gpt_neox", "phi")

# Special tokens, in id order: <s> = 0, </s> = 1, <pad> = 2, <unk> = 3.
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)

# Chat = the training format: system/user text after <s>, assistant text as " answer</s>".
# The generation prompt adds nothing: the model itself continues with " answer".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{% if not loop.first %}{{ '\n' }}{% endif %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_NAME = "tiny-llama-v1"
MARKER_FILE = "memoir-tiny.json"
SHIPPED_BUILTIN = DATA_DIR / BUILTIN_NAME  # the built-in model as trained here once, shipped with the package


# ---------------------------------------------------------------------------------- data


def zsre_records(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The zsRE records, one dict per line of the JSONL file (default: the shipped dev file)."""
    path = Path(path) if path is not None else ZSRE_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def qa_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Training lines of the QA model: `src answer`, `rephrase answer`, `loc loc_ans` per record."""
    texts = []
    for r in records:
        answer = r["answers"][0]
        texts.append(f"{r['src']} {answer}")
        texts.append(f"{r['rephrase']} {answer}")
        texts.append(f"{r['loc']} {r['loc_ans']}")
    return texts


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; it adds <s> in front of each text (see module doc)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # "<s> $A" lives in tokenizer.json, so a reloaded tokenizer adds BOS exactly like this one.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
    )


# -------------------------------------------------------------------------------- models


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 4,
    intermediate: int | None = None,
    heads: int = 4,
    max_positions: int = 256,
    *,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 2,
) -> PretrainedConfig:
    """A small transformers config of `arch`; the default special ids are `train_tokenizer`'s."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}, expected one of {ARCHITECTURES}")
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
    intermediate = intermediate or 4 * hidden
    head_dim = hidden // heads
    if arch in ("llama", "mistral", "qwen2"):
        sizes = dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
        if arch == "mistral":
            sizes["sliding_window"] = None
    elif arch in ("gpt2", "gptj"):
        sizes = dict(
            n_embd=hidden,
            n_inner=intermediate,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        if arch == "gptj":
            sizes["rotary_dim"] = head_dim
    elif arch == "gpt_neox":
        sizes = dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
    else:  # phi
        sizes = dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
        )
    return AutoConfig.for_model(
        arch,
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **sizes,
    )


def build_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **sizes: Any
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of `arch` for `tokenizer`, in eval mode."""
    config = tiny_config(
        arch,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_pretrained_pair(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike
) -> Path:
    """Save model and tokenizer side by side, as a hub repository holds them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_pretrained_pair(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load (model, tokenizer) with the Auto classes, from a local directory or a hub id.

    `dtype` defaults to float32. A tokenizer without a pad token gets its eos token as pad.
    """
    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = str(path_or_hub_id)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------ training


def _encode_lines(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Each text as `<s> text </s>` token ids."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *x, tokenizer.eos_token_id] for x in ids]


def _batch(lines: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on padding."""
    width = max(len(x) for x in lines)
    input_ids = torch.full((len(lines), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lines), width), dtype=torch.long)
    for i, x in enumerate(lines):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def _epoch_batches(
    lengths: Sequence[int], batch_size: int, gen: torch.Generator
) -> list[list[int]]:
    """One epoch of index batches: shuffled, then lines of similar length batched together.

    Sorting within chunks of 8 batches halves the padding (a few zsRE lines are 5x the median).
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = 8 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _train_threads() -> int:
    """Half the usable cores (at most 4): tiny matmuls gain little from more, and on a busy
    2-core machine two spinning threads run several times slower than one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 1) // 2))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_qa_model(
    directory: str | os.PathLike,
    steps: int = 1000,
    hidden: int = 128,
    layers: int = 4,
    intermediate: int = 512,
    vocab_size: int = 2048,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train the tiny Llama on the zsRE QA lines and save it (with its tokenizer) to `directory`.

    Causal LM loss on whole `<s> question answer </s>` lines, AdamW with a one-cycle schedule.
    Deterministic given `seed` (on one machine). Writes `memoir-tiny.json` last.
    """
    start = time.perf_counter()
    records = zsre_records()
    texts = qa_texts(records)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    lines = _encode_lines(tokenizer, texts)
    model = build_model(
        "llama", tokenizer, seed=seed, hidden=hidden, layers=layers, intermediate=intermediate
    )
    logger.info(
        "training tiny llama: %d lines, %d params, %d steps",
        len(lines),
        sum(p.numel() for p in model.parameters()),
        steps,
    )

    gen = torch.Generator().manual_seed(seed)
    lengths = [len(x) for x in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    batches: list[list[int]] = []
    loss_value = math.nan
    model.train()
    with _torch_threads(_train_threads()):
        for step in range(1, steps + 1):
            if not batches:
                batches = _epoch_batches(lengths, batch_size, gen)
            picked = [lines[i] for i in batches.pop()]
            input_ids, mask, labels = _batch(picked, tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
            if progress is not None:
                progress(step, loss_value)
            if step % 100 == 0 or step == steps:
                logger.debug("step %d/%d loss %.4f", step, steps, loss_value)
    model.eval()
    seconds = time.perf_counter() - start
    logger.info("trained tiny llama in %.1f s, final loss %.4f", seconds, loss_value)

    directory = save_pretrained_pair(model, tokenizer, directory)
    marker = {
        "format": "memoir-tiny-qa/1",
        "arch": "llama",
        "data": ZSRE_FILE.name,
        "records": len(records),
        "lines": len(lines),
        "steps": steps,
        "hidden": hidden,
        "layers": layers,
        "intermediate": intermediate,
        "heads": 4,
        "vocab_size": vocab_size,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": loss_value,
        "train_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return directory


@torch.no_grad()
def teacher_forced_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    targets: Sequence[str],
) -> float:
    """Teacher-forced accuracy: feed `prompt + " " + target`, score the argmax at each target
    token; the mean over pairs of each pair's share of right tokens (EasyEdit's zsRE metric)."""
    scores = []
    device = next(model.parameters()).device
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids], device=device)
        logits = model(input_ids=ids).logits[0]
        n = len(prompt_ids)
        predicted = logits[n - 1 : n - 1 + len(target_ids)].argmax(-1)
        expected = torch.tensor(target_ids, device=device)
        scores.append((predicted == expected).float().mean().item())
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------ built-in model


def _is_complete(directory: Path) -> bool:
    """True if `directory` holds a finished built-in model (its named marker is written last)."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == BUILTIN_NAME


def builtin_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the built-in tiny trained Llama.

    The package ships it (`memoir/data/tiny-llama-v1`, 6 MB, trained once by `train_qa_model`), so
    it is the same model on every machine. Without the shipped copy, or given `cache_dir`, it is
    trained once under the cache root (`cache_dir`, else `$MEMOIR_CACHE`, else `~/.cache/memoir`):
    into a temporary directory renamed into place when complete, under a file lock, so
    concurrent callers wait for one training and never see a half-written model.
    """
    if cache_dir is None and _is_complete(SHIPPED_BUILTIN):
        return SHIPPED_BUILTIN

    def build(tmp: Path) -> None:
        logger.info("training the built-in tiny model into %s", tmp.parent / BUILTIN_NAME)
        train_qa_model(tmp)
        marker = json.loads((tmp / MARKER_FILE).read_text())
        (tmp / MARKER_FILE).write_text(json.dumps({"name": BUILTIN_NAME, **marker}, indent=2) + "\n")

    return build_once(cache_root(cache_dir), BUILTIN_NAME, build, _is_complete)
