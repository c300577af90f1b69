"""Tests of memoir.tinymodel: tokenizer, tiny models of every architecture, the built-in model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from memoir import tinymodel
from memoir.tinymodel import ARCHITECTURES, MARKER_FILE

# The FFN output projection MEMOIR edits, per architecture (see docs/MEMOIR.md).
FFN_OUT = {
    "llama": "model.layers.0.mlp.down_proj",
    "mistral": "model.layers.0.mlp.down_proj",
    "qwen2": "model.layers.0.mlp.down_proj",
    "gpt2": "transformer.h.0.mlp.c_proj",
    "gptj": "transformer.h.0.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.0.mlp.dense_4h_to_h",
    "phi": "model.layers.0.mlp.fc2",
}


def test_zsre_records_and_qa_texts(zsre):
    assert len(zsre) == 451
    texts = tinymodel.qa_texts(zsre)
    assert len(texts) == 3 * len(zsre)
    first = zsre[0]
    assert texts[:3] == [
        f"{first['src']} {first['answers'][0]}",
        f"{first['rephrase']} {first['answers'][0]}",
        f"{first['loc']} {first['loc_ans']}",
    ]


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer, zsre):
    for text in (zsre[0]["src"], zsre[1]["loc"], "Größe — naïve ★ 東京?"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # BOS is added, EOS is not
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == 2048
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token] == [
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    ]


def test_tokenizer_save_load_is_identical(zsre, tmp_path):
    fresh = tinymodel.train_tokenizer(tinymodel.qa_texts(zsre[:50]), vocab_size=512)
    fresh.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [r["src"] + " " + r["answers"][0] for r in zsre[:20]]
    assert loaded(texts)["input_ids"] == fresh(texts)["input_ids"]
    assert loaded.pad_token_id == fresh.pad_token_id == 2
    assert loaded.chat_template == fresh.chat_template


def test_chat_template_matches_training_format(tokenizer, zsre):
    question, answer = zsre[0]["src"], zsre[0]["answers"][0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<s>" + question
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        tokenize=False,
    )
    assert full == f"<s>{question} {answer}</s>"
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert encoded["input_ids"] == tokenizer(question)["input_ids"]


# ------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_save_load_same_logits(arch, tokenizer, zsre, tmp_path):
    model = tinymodel.build_model(arch, tokenizer, seed=0, hidden=64, layers=2, intermediate=96)
    assert not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    ffn_out = model.get_submodule(FFN_OUT[arch])
    in_features = ffn_out.weight.shape[0] if arch == "gpt2" else ffn_out.in_features  # Conv1D
    assert in_features == 96

    tinymodel.save_pretrained_pair(model, tokenizer, tmp_path)
    loaded, loaded_tok = tinymodel.load_pretrained_pair(tmp_path)
    assert type(loaded) is type(model) and not loaded.training

    batch = loaded_tok([r["src"] for r in zsre[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**batch).logits
    assert got.shape == (4, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.equal(got, expected)


def test_build_model_is_seeded(tokenizer):
    a = tinymodel.build_model("llama", tokenizer, seed=1, hidden=32, layers=1)
    b = tinymodel.build_model("llama", tokenizer, seed=1, hidden=32, layers=1)
    c = tinymodel.build_model("llama", tokenizer, seed=2, hidden=32, layers=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_any_arch_fixture_generates(any_arch_model):
    model, tok = any_arch_model
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    tok.padding_side = "left"
    questions = ["Who is it?", "What university did Watts Humphrey attend?"]
    batch = tok(questions, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_load_sets_missing_pad_token(tiny_llama, tmp_path):
    model, tok = tiny_llama
    tok.pad_token = None
    tinymodel.save_pretrained_pair(model, tok, tmp_path)
    _, loaded_tok = tinymodel.load_pretrained_pair(tmp_path, dtype="bfloat16")
    assert loaded_tok.pad_token == loaded_tok.eos_token
    loaded, _ = tinymodel.load_pretrained_pair(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------- training


def test_train_qa_model_is_deterministic(tmp_path):
    settings = dict(steps=3, hidden=32, layers=1, intermediate=64, vocab_size=512, batch_size=8)
    seen: list[tuple[int, float]] = []
    tinymodel.train_qa_model(tmp_path / "a", progress=lambda s, l: seen.append((s, l)), **settings)
    tinymodel.train_qa_model(tmp_path / "b", **settings)
    assert [s for s, _ in seen] == [1, 2, 3]
    a, _ = tinymodel.load_pretrained_pair(tmp_path / "a")
    b, _ = tinymodel.load_pretrained_pair(tmp_path / "b")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    marker = json.loads((tmp_path / "a" / MARKER_FILE).read_text())
    assert marker["steps"] == 3 and marker["final_loss"] == pytest.approx(seen[-1][1])


@pytest.mark.slow
def test_trained_llama_memorised_training_questions(trained_llama, zsre):
    model, tok = trained_llama
    records = zsre[:20]
    accuracy = tinymodel.teacher_forced_accuracy(
        model, tok, [r["src"] for r in records], [r["answers"][0] for r in records]
    )
    assert accuracy > 0.8
    # Not a constant: answers it never saw (the edit targets) are mostly wrong.
    unseen = [(r["src"], r["alt"]) for r in records if r["alt"]]
    wrong = tinymodel.teacher_forced_accuracy(model, tok, *zip(*unseen))
    assert wrong < 0.5


# ------------------------------------------------------------------------------ built-in model


@pytest.mark.slow
def test_builtin_model_path_is_cached(trained_llama_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("builtin_model_path retrained a cached model")

    marker = trained_llama_path / MARKER_FILE
    mtime = marker.stat().st_mtime_ns
    monkeypatch.setattr(tinymodel, "train_qa_model", no_training)
    assert tinymodel.builtin_model_path() == trained_llama_path
    assert tinymodel.builtin_model_path() == trained_llama_path
    assert marker.stat().st_mtime_ns == mtime
    assert json.loads(marker.read_text())["name"] == tinymodel.BUILTIN_NAME


def test_the_builtin_model_is_the_shipped_one_on_every_machine():
    """The package ships the trained weights, so a test's outcome never depends on which machine
    (or which BLAS) trained the built-in model."""
    import hashlib

    path = tinymodel.builtin_model_path()
    assert path == tinymodel.SHIPPED_BUILTIN
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == "13b4f6412cbb089eaa36f1e23f1d0425529785a21158cf04bf1e80934b26185a"


def _fake_trainer(calls: list[Path], delay: float = 0.2):
    """Stands in for train_qa_model: slow, and writes its marker last."""

    def train(directory, **kwargs):
        calls.append(Path(directory))
        threading.Event().wait(delay)
        (Path(directory) / "weights.bin").write_bytes(b"x")
        (Path(directory) / MARKER_FILE).write_text(json.dumps({"final_loss": 0.0}))
        return Path(directory)

    return train


def test_builtin_model_path_concurrent_callers_train_once(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(tinymodel, "train_qa_model", _fake_trainer(calls))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(tinymodel.builtin_model_path(tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / tinymodel.BUILTIN_NAME] * 4
    assert (results[0] / "weights.bin").exists()
    assert json.loads((results[0] / MARKER_FILE).read_text())["name"] == tinymodel.BUILTIN_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [tinymodel.BUILTIN_NAME, f"{tinymodel.BUILTIN_NAME}.lock"]
    )


def test_builtin_model_path_crash_leaves_nothing(tmp_path, monkeypatch):
    def crash(directory, **kwargs):
        (Path(directory) / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    monkeypatch.setattr(tinymodel, "train_qa_model", crash)
    with pytest.raises(RuntimeError):
        tinymodel.builtin_model_path(tmp_path)
    assert not (tmp_path / tinymodel.BUILTIN_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"{tinymodel.BUILTIN_NAME}.lock"]

    # A leftover from a hard kill (no cleanup ran) and an incomplete target are replaced.
    (tmp_path / f".{tinymodel.BUILTIN_NAME}.tmp-dead").mkdir()
    (tmp_path / tinymodel.BUILTIN_NAME).mkdir()
    calls: list[Path] = []
    monkeypatch.setattr(tinymodel, "train_qa_model", _fake_trainer(calls, delay=0))
    path = tinymodel.builtin_model_path(tmp_path)
    assert len(calls) == 1 and (path / MARKER_FILE).exists()
    assert not (tmp_path / f".{tinymodel.BUILTIN_NAME}.tmp-dead").exists()
