"""Models whose architecture is not in memoir.locate.ARCHITECTURES: the FFN output projection is
found from the model's structure, or named with `module_path` / `--module-path`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memoir import Editor, MemoirConfig, UnknownArchitectureError, locate
from memoir.locate import ARCHITECTURES
from memoir.tinymodel import load_pretrained_pair, save_pretrained_pair
from store import Store

REPO = Path(__file__).resolve().parent.parent

# model_type -> (config sizes of a 3-layer, 64-wide model with a 96-wide FFN, expected projection at layer 1)
UNLISTED = {
    "starcoder2": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4), "model.layers.1.mlp.c_proj"),
    "stablelm": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4), "model.layers.1.mlp.down_proj"),
    "falcon": (dict(hidden_size=64, ffn_hidden_size=96, num_hidden_layers=3, num_attention_heads=4),
               "transformer.h.1.mlp.dense_4h_to_h"),
    "opt": (dict(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64),
            "model.decoder.layers.1.fc2"),
    "codegen": (dict(n_embd=64, n_inner=96, n_layer=3, n_head=4, rotary_dim=8), "transformer.h.1.mlp.fc_out"),
}
BACKGROUND = ["nq question: who sang nice day for a white wedding", "nq question: when was the first iphone",
              "nq question: where is the eiffel tower"]


def unlisted_model(arch: str, tokenizer) -> torch.nn.Module:
    sizes, _ = UNLISTED[arch]
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.fixture(scope="module")
def starcoder2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_pretrained_pair(unlisted_model("starcoder2", tokenizer), tokenizer, tmp_path_factory.mktemp("sc2"))


@pytest.mark.parametrize("arch", sorted(UNLISTED))
def test_the_projection_of_an_unlisted_architecture_is_found_from_its_structure(arch, tokenizer):
    assert arch not in ARCHITECTURES
    model = unlisted_model(arch, tokenizer)
    site = locate(model, 1)
    assert site.module_path == UNLISTED[arch][1]
    assert (site.in_features, site.out_features, site.num_layers) == (96, 64, 3)
    assert model.get_submodule(site.module_path)(torch.zeros(1, 96)).shape == (1, 64)


def test_editor_edits_an_unlisted_architecture(starcoder2_dir):
    model, tokenizer = load_pretrained_pair(starcoder2_dir)
    editor = Editor.create(model, tokenizer, BACKGROUND, MemoirConfig(layer=1, n_iter=10))
    assert editor.memory.site.module_path == "model.layers.1.mlp.c_proj"
    result = editor.edit("What university did Watts Humphrey attend?", "University of Michigan")
    assert result.steps >= 1 and result.scores["retrieved"] == 1.0
    # a saved memory finds the same projection again
    state = editor.state()
    again = Editor.from_state(*load_pretrained_pair(starcoder2_dir), state)
    assert again.memory.site.module_path == editor.memory.site.module_path


def test_ambiguous_structure_asks_for_module_path(tokenizer):
    model = unlisted_model("starcoder2", tokenizer)
    mlp = model.model.layers[1].mlp
    mlp.c_proj_twin = torch.nn.Linear(96, 64)  # two maps from the FFN width to the hidden size
    with pytest.raises(UnknownArchitectureError, match="module_path"):
        locate(model, 1)
    assert locate(model, 1, module_path="model.layers.{layer}.mlp.c_proj").module_path == "model.layers.1.mlp.c_proj"


def test_memoir_apply_on_an_unlisted_architecture(starcoder2_dir, zsre, tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(r) + "\n" for r in zsre[:2]))
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "apply", "--model", str(starcoder2_dir), "--file",
                           str(edits), "--store", str(store), "--layer", "1", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == 2
    with Store.open(store) as opened:
        assert opened.load_state("default").model.module_path == "model.layers.1.mlp.c_proj"


def test_module_path_option(starcoder2_dir, zsre, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(zsre[0]) + "\n")
    base = ["apply", "--model", str(starcoder2_dir), "--file", str(edits), "--layer", "1"]
    # an explicit projection: the FFN's input map, not the one the structure would pick
    result = CliRunner().invoke(main, [*base, "--store", str(tmp_path / "a"), "--module-path",
                                       "model.layers.{layer}.mlp.c_fc"])
    assert result.exit_code == 0, result.output
    with Store.open(tmp_path / "a") as store:
        state = store.load_state("default")
        assert (state.config.module_path, state.model.module_path) == ("model.layers.{layer}.mlp.c_fc",
                                                                       "model.layers.1.mlp.c_fc")
    # a stored memory refuses another projection
    result = CliRunner().invoke(main, [*base, "--store", str(tmp_path / "a"), "--module-path",
                                       "model.layers.{layer}.mlp.c_proj"])
    assert result.exit_code == 2 and "module_path" in result.stderr  # invalid input
    # a projection that does not exist: one clear line
    result = CliRunner().invoke(main, [*base, "--store", str(tmp_path / "b"), "--module-path",
                                       "model.layers.{layer}.mlp.nope"])
    assert result.exit_code == 2 and "has no module 'model.layers.0.mlp.nope'" in result.stderr.splitlines()[-1]
