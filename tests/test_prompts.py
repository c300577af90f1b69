"""Targets are tokenised as the model reads them after the prompt, on a SentencePiece tokenizer
(Llama-2 / Mistral style) built here: tokenised alone, `" " + target` gains a lone word-start token."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memoir.prompts import PromptCodec

PROMPT, TARGET = "What university did Watts Humphrey attend?", "University of Michigan"


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(zsre) -> PreTrainedTokenizerFast:
    """A BPE trained on the zsRE text with merges inside words only, then encoding as Llama-2's
    tokenizer.json does: every space becomes '▁', one '▁' is prepended, no pre-tokenizer."""
    from memoir.tinymodel import qa_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(qa_texts(zsre), trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_fixture_has_the_sentencepiece_quirk(sentencepiece_tokenizer):
    alone = sentencepiece_tokenizer.convert_ids_to_tokens(sentencepiece_tokenizer(" " + TARGET, add_special_tokens=False)["input_ids"])
    assert alone[:2] == ["▁", "▁University"]


def test_target_ids_are_those_after_the_prompt(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    codec = PromptCodec(tok, prepend_bos=True)
    target = codec.target_ids(PROMPT, TARGET)
    joined = tok(PROMPT + " " + TARGET, add_special_tokens=False)["input_ids"]
    assert codec.prompt_ids(PROMPT)[1:] + target == joined
    assert tok.convert_ids_to_tokens(target)[0] == "▁University"
    assert tok.decode(target).strip() == TARGET


def test_the_editor_trains_on_the_ids_the_model_reads(sentencepiece_tokenizer):
    from memoir import Editor, MemoirConfig
    from memoir.tinymodel import build_model

    model = build_model("llama", sentencepiece_tokenizer, seed=0, hidden=32, layers=2, heads=2)
    editor = Editor.create(model, sentencepiece_tokenizer, ["nq question: who sang nice day for a white wedding"],
                           MemoirConfig(layer=1))
    batch = editor.batch([PROMPT], [TARGET])
    labels = batch.labels[0][batch.target_mask[0]].tolist()
    assert labels == PromptCodec(sentencepiece_tokenizer).target_ids(PROMPT, TARGET)
    assert "▁" not in sentencepiece_tokenizer.convert_ids_to_tokens(labels)


def test_byte_level_targets_are_unchanged(tokenizer):
    """On a byte-level BPE (GPT-2, SmolLM2, the tiny models) both forms agree: nothing to replay."""
    codec = PromptCodec(tokenizer)
    assert codec.target_ids(PROMPT, TARGET) == tokenizer(" " + TARGET, add_special_tokens=False)["input_ids"]
