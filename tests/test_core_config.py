"""MemoirConfig defaults, checks and JSON round trip; locating the edited projection per architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memoir.config import ConfigError, MemoirConfig
from memoir.locate import UnknownArchitectureError, intermediate_size, locate

# architecture -> (edited module at layer 1, its class name, weight stored (in, out))
EXPECTED_SITES = {
    "llama": ("model.layers.1.mlp.down_proj", "Linear", False),
    "mistral": ("model.layers.1.mlp.down_proj", "Linear", False),
    "qwen2": ("model.layers.1.mlp.down_proj", "Linear", False),
    "gpt2": ("transformer.h.1.mlp.c_proj", "Conv1D", True),
    "gptj": ("transformer.h.1.mlp.fc_out", "Linear", False),
    "gpt_neox": ("gpt_neox.layers.1.mlp.dense_4h_to_h", "Linear", False),
    "phi": ("model.layers.1.mlp.fc2", "Linear", False),
}


# ------------------------------------------------------------------------------------- config


def test_defaults_follow_the_paper_scaled_to_the_model():
    config = MemoirConfig()
    assert (config.threshold, config.n_iter, config.lr) == (None, 30, 1.0)  # None: fitted to the model
    llama3 = config.resolve(num_layers=32, intermediate_size=14336)
    assert (llama3.layer, llama3.top_k) == (27, 4096)
    small = config.resolve(num_layers=4, intermediate_size=512)
    assert small.layer == 3  # int(0.84 * 4)
    assert small.top_k == round(512 * 4096 / 14336) == 146


def test_the_threshold_is_fitted_to_the_model_unless_given(trained_llama, trained_llama_path, zsre):
    """Unrelated prompts' masks overlap by chance around k/D; the fitted threshold clears the best of
    `threshold_capacity` such overlaps, is stored in the config, and an explicit one wins."""
    from memoir import Editor
    from memoir.tinymodel import load_pretrained_pair

    model, tokenizer = trained_llama
    background = [r["loc"] for r in zsre[400:450]]
    editor = Editor.create(model, tokenizer, background, MemoirConfig())
    fit = editor.config.threshold_fit
    assert editor.config.threshold == fit["threshold"] == editor.memory.threshold == editor.state().config.threshold
    assert fit["pairs"] == 50 * 49 // 2 and 0.2 < fit["chance_mean"] < 0.5 and fit["chance_sd"] > 0
    assert fit["chance_max"] < fit["threshold"] < 1.0
    masks = editor.masks_of([r["src"] for r in zsre[300:340]])  # prompts the fit never saw
    ratios, _ = (masks @ editor.masks_of([r["loc"] for r in zsre[200:240]]).T / editor.config.top_k).max(dim=1)
    assert (ratios < editor.config.threshold).all()
    model, tokenizer = load_pretrained_pair(trained_llama_path)
    explicit = Editor.create(model, tokenizer, background, MemoirConfig(threshold=0.45))
    assert explicit.config.threshold == explicit.memory.threshold == 0.45 and explicit.config.threshold_fit is None


def test_explicit_layer_and_top_k_are_kept_and_checked():
    config = MemoirConfig(layer=2, top_k=146).resolve(num_layers=4, intermediate_size=512)
    assert (config.layer, config.top_k) == (2, 146)
    with pytest.raises(ConfigError, match="layer 4 does not exist"):
        MemoirConfig(layer=4).resolve(num_layers=4, intermediate_size=512)
    with pytest.raises(ConfigError, match="exceeds the FFN width"):
        MemoirConfig(top_k=513).resolve(num_layers=4, intermediate_size=512)


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.5), dict(n_iter=0), dict(lr=0.0), dict(lr=float("inf")), dict(lr=float("nan")),
                                 dict(top_k=0), dict(layer=-1), dict(dtype="int8"), dict(prompt_format="xml"),
                                 dict(weight_decay=-1.0), dict(background_size=0), dict(threshold_capacity=0),
                                 dict(threshold_false_retrievals=0.0), dict(threshold_false_retrievals=5000.0)])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        MemoirConfig(**bad)


def test_json_round_trip():
    config = MemoirConfig(layer=2, top_k=146, threshold=0.55, n_iter=12, lr=0.5, seed=7, background_size=40,
                          dtype="bfloat16", module_path="model.layers.{layer}.mlp.down_proj", prompt_format="chat")
    again = MemoirConfig.from_json(config.to_json())
    assert again == config
    assert MemoirConfig.from_json(MemoirConfig().to_json()) == MemoirConfig()
    with pytest.raises(ConfigError, match="unknown MEMOIR settings"):
        MemoirConfig.from_dict({**config.to_dict(), "topk": 3})


# ------------------------------------------------------------------------------------- locate


@pytest.mark.parametrize("arch", sorted(EXPECTED_SITES))
def test_locate_finds_the_ffn_output_projection(arch, tiny_model_factory):
    model, _ = tiny_model_factory(arch, intermediate=96)
    path, class_name, transposed = EXPECTED_SITES[arch]
    site = locate(model, 1)
    module = model.get_submodule(site.module_path)
    assert site.module_path == path
    assert type(module).__name__ == class_name
    assert (site.in_features, site.out_features, site.transposed) == (96, 64, transposed)
    assert (site.layer, site.num_layers) == (1, 4)
    assert intermediate_size(model) == 96
    # the projection really maps the FFN width to the hidden size
    assert module(torch.zeros(1, 96)).shape == (1, 64)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn_out = nn.Linear(8, 4)
        self.gate_out = nn.Linear(8, 4)  # two maps from the FFN width to the hidden size: ambiguous


class _Unknown(nn.Module):
    """A model of an architecture MEMOIR has never heard of."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": "made-up-arch", "num_hidden_layers": 2})()
        self.blocks = nn.ModuleList([_Block(), _Block()])


def test_unknown_architecture_names_itself_and_the_escape_hatch():
    model = _Unknown()
    with pytest.raises(UnknownArchitectureError, match="made-up-arch") as info:
        locate(model, 1)
    assert "module_path" in str(info.value) and "several candidates" in str(info.value)
    site = locate(model, 1, module_path="blocks.{layer}.ffn_out")
    assert site.module_path == "blocks.1.ffn_out"
    assert (site.in_features, site.out_features, site.num_layers) == (8, 4, 2)


def test_explicit_module_path_must_exist_and_be_linear(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(UnknownArchitectureError, match="no module"):
        locate(model, 1, module_path="model.layers.{layer}.mlp.nope")
    with pytest.raises(UnknownArchitectureError, match="not a Linear"):
        locate(model, 1, module_path="model.layers.{layer}.mlp")
    assert locate(model, 1, module_path="model.layers.{layer}.mlp.up_proj").in_features == 64


def test_editor_on_an_unknown_architecture_locates_from_structure_or_module_path(tiny_model_factory):
    from memoir import Editor

    model, tokenizer = tiny_model_factory("llama")
    model.config.model_type = "my-private-llama"
    background = ["nq question: who sang nice day for a white wedding", "nq question: when was the first iphone"]
    assert locate(model, 1).module_path == "model.layers.1.mlp.down_proj"  # found from the structure
    editor = Editor.create(model, tokenizer, background,
                           MemoirConfig(layer=1, module_path="model.layers.{layer}.mlp.down_proj"))
    assert editor.memory.site.module_path == "model.layers.1.mlp.down_proj"
    assert model.get_submodule("model.layers.1.mlp.down_proj") is editor.memory
    result = editor.edit("What university did Watts Humphrey attend?", "University of Michigan", score=False)
    assert result.steps >= 1 and editor.memory.index.edit_count == 1


def test_fit_threshold_on_random_masks_matches_the_hypergeometric_law():
    """Random k-of-D masks overlap by k/D on average: the fit from 200 of them and the fallback
    used with fewer than 3 prompts (the law itself) agree, and more capacity means a higher τ."""
    import torch

    from memoir.tophash import dense_masks, fit_threshold

    size, k = 1536, 439
    generator = torch.Generator().manual_seed(0)
    columns = torch.stack([torch.randperm(size, generator=generator)[:k] for _ in range(200)])
    measured = fit_threshold(dense_masks(columns, size), k, capacity=10_000, false_retrievals=0.01)
    law = fit_threshold(dense_masks(columns[:2], size), k, capacity=10_000, false_retrievals=0.01)
    assert law["pairs"] == 0 and law["chance_mean"] == round(k / size, 4)
    assert abs(measured["chance_mean"] - law["chance_mean"]) < 0.005
    assert abs(measured["chance_sd"] - law["chance_sd"]) < 0.003
    assert abs(measured["threshold"] - law["threshold"]) < 0.02
    assert measured["chance_max"] < measured["threshold"]
    smaller = fit_threshold(dense_masks(columns, size), k, capacity=10, false_retrievals=0.01)
    assert measured["chance_mean"] < smaller["threshold"] < measured["threshold"]
