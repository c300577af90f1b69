"""Find the FFN output projection that MEMOIR edits.

Three ways, in order: an explicit `module_path` (with `{layer}`); the architecture table
`ARCHITECTURES`; else the model's structure: the decoder blocks are the largest `nn.ModuleList`
(of the model's depth when the config says it), and in each block the projection is the one
Linear/Conv1D that maps the FFN width back to the hidden size (preferring one inside the
block's MLP). Anything ambiguous raises UnknownArchitectureError naming `module_path`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (path of the decoder blocks, path of the FFN output projection inside a block)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "mixtral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "qwen3": ("model.layers", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp.down_proj"),
    "olmo": ("model.layers", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "phi": ("model.layers", "mlp.fc2"),
}


class UnknownArchitectureError(LookupError):
    """The model's architecture has no known FFN output projection."""


@dataclass(frozen=True)
class ProjectionSite:
    """Where the edited projection sits and its shapes: D inputs (FFN width) to d outputs (hidden)."""

    module_path: str
    layer: int
    num_layers: int
    in_features: int
    out_features: int
    transposed: bool  # GPT-2's Conv1D keeps its weight as (in, out)


_DEPTH = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward")


def _unknown(model: nn.Module, why: str) -> UnknownArchitectureError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return UnknownArchitectureError(
        f"MEMOIR does not know where the FFN output projection of a {model_type!r} model "
        f"({type(model).__name__}) is: {why}; pass module_path explicitly, e.g. "
        f"'model.layers.{{layer}}.mlp.down_proj' (known: {', '.join(sorted(ARCHITECTURES))})"
    )


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear or a transformers Conv1D (weight stored as (in, out)), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _find_blocks(model: nn.Module) -> str:
    """The path of the decoder blocks: the largest ModuleList, of the config's depth when it has one."""
    lists = [(path, len(m)) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    depth = _config_int(model, _DEPTH)
    deep = [entry for entry in lists if entry[1] == depth] if depth else []
    candidates = deep or lists
    if not candidates:
        raise _unknown(model, "it has no list of blocks")
    return max(candidates, key=lambda entry: entry[1])[0]  # the first of the largest: the outermost


def _find_projection(model: nn.Module, block: nn.Module) -> str:
    """Inside one block: the Linear/Conv1D mapping the FFN width to the hidden size."""
    hidden, ffn = _config_int(model, _HIDDEN), _config_int(model, _FFN)
    shapes = {path: shape for path, m in block.named_modules() if (shape := _linear_shape(m)) is not None}
    if hidden is None and shapes:  # the most common output size in a block is the hidden size
        outs = [out for _, out in shapes.values()]
        hidden = max(set(outs), key=outs.count)
    found = [path for path, (d_in, d_out) in shapes.items()
             if d_out == hidden and d_in != hidden and (ffn is None or d_in == ffn)]
    in_mlp = [path for path in found if any(part in _MLP_NAMES for part in path.lower().split("."))]
    found = in_mlp or found
    if len(found) != 1:
        why = "no linear layer maps the FFN width to the hidden size" if not found else f"several candidates {found}"
        raise _unknown(model, why)
    return found[0]


def _blocks_path(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type][0]
    return _find_blocks(model)


def num_layers(model: nn.Module) -> int:
    depth = _config_int(model, _DEPTH)
    if depth:
        return depth
    try:
        return len(model.get_submodule(_find_blocks(model)))
    except UnknownArchitectureError:
        raise UnknownArchitectureError(f"cannot tell the depth of a {type(model).__name__}") from None


def projection_path(model: nn.Module, layer: int, module_path: str | None = None) -> str:
    """The dotted path of layer `layer`'s FFN output projection. `module_path` may contain `{layer}`."""
    if module_path:
        return module_path.replace("{layer}", str(layer))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        blocks, inner = ARCHITECTURES[model_type]
        return f"{blocks}.{layer}.{inner}"
    blocks = _find_blocks(model)
    try:
        block = model.get_submodule(f"{blocks}.{layer}")
    except AttributeError:
        raise _unknown(model, f"{blocks} has no block {layer}") from None
    return f"{blocks}.{layer}.{_find_projection(model, block)}"


def _shapes(module: nn.Module, path: str) -> tuple[int, int, bool]:
    shape = _linear_shape(module)
    if shape is None:
        raise UnknownArchitectureError(f"{path} is a {type(module).__name__}, not a Linear or Conv1D projection")
    return shape[0], shape[1], not isinstance(module, nn.Linear)  # GPT-2's Conv1D keeps its weight as (in, out)


def locate(model: nn.Module, layer: int, module_path: str | None = None) -> ProjectionSite:
    """Describe the projection MEMOIR edits at `layer` (checked to exist and to be a linear map)."""
    depth = num_layers(model) if not module_path else _depth_or_unknown(model)
    path = projection_path(model, layer, module_path)
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise UnknownArchitectureError(f"{type(model).__name__} has no module {path!r}") from exc
    d_in, d_out, transposed = _shapes(module, path)
    return ProjectionSite(path, layer, depth, d_in, d_out, transposed)


def _depth_or_unknown(model: nn.Module) -> int:
    try:
        return num_layers(model)
    except UnknownArchitectureError:
        return -1


def intermediate_size(model: nn.Module, module_path: str | None = None) -> int:
    """The FFN width D of the model (the edited projection's input size)."""
    return locate(model, 0, module_path).in_features
