"""MemoirConfig: every setting of one MEMOIR memory, with the paper's defaults scaled to a model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

# Llama-3-8B in the paper: layer 27 of 32, k = 4096 of D = 14336.
PAPER_LAYER_FRACTION = 27 / 32
PAPER_TOP_K_FRACTION = 4096 / 14336

PROMPT_FORMATS = ("plain", "chat")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A MEMOIR setting is out of range or does not fit the model."""


@dataclass(frozen=True)
class MemoirConfig:
    """Settings of one memory. `layer`/`top_k` left as None are filled from the model by `resolve`."""

    layer: int | None = None
    top_k: int | None = None
    # None: fitted to the model when the memory is created (memoir.tophash.fit_threshold), so that
    # an unrelated prompt retrieves none of `threshold_capacity` stored masks but with probability
    # `threshold_false_retrievals`; the fitted value and its statistics are stored here.
    threshold: float | None = None
    threshold_capacity: int = 10_000
    threshold_false_retrievals: float = 0.01
    threshold_fit: dict[str, float] | None = None
    n_iter: int = 30
    lr: float = 1.0
    grad_clip: float = 1.0
    stop_loss: float = 0.02
    stop_delta: float = 1e-4
    # 0 keeps an edit's change exactly G·Aᵀ (compact, exact); > 0 decays only the edit's own columns.
    weight_decay: float = 0.0
    seed: int = 0
    background_size: int = 100
    check_size: int = 4
    dtype: str = "float32"
    module_path: str | None = None
    prompt_format: str = "plain"

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.threshold_capacity < 1:
            raise ConfigError(f"threshold_capacity must be >= 1, got {self.threshold_capacity}")
        if not 0.0 < self.threshold_false_retrievals < self.threshold_capacity / 2:
            raise ConfigError(f"threshold_false_retrievals must be in (0, threshold_capacity / 2), "
                              f"got {self.threshold_false_retrievals}")
        if self.n_iter < 1:
            raise ConfigError(f"n_iter must be >= 1, got {self.n_iter}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be > 0 and finite, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.background_size < 1:
            raise ConfigError(f"background_size must be >= 1, got {self.background_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")

    def resolve(self, num_layers: int, intermediate_size: int) -> "MemoirConfig":
        """Fill `layer` and `top_k` from the model's depth and FFN width, and check both fit."""
        layer = self.layer if self.layer is not None else min(num_layers - 1, int(PAPER_LAYER_FRACTION * num_layers))
        top_k = self.top_k if self.top_k is not None else max(1, round(PAPER_TOP_K_FRACTION * intermediate_size))
        if layer >= num_layers:
            raise ConfigError(f"layer {layer} does not exist: the model has {num_layers} layers")
        if top_k > intermediate_size:
            raise ConfigError(f"top_k {top_k} exceeds the FFN width {intermediate_size}")
        return dataclasses.replace(self, layer=layer, top_k=top_k)

    def replace(self, **changes: Any) -> "MemoirConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoirConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown MEMOIR settings: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MemoirConfig":
        return cls.from_dict(json.loads(text))


__all__ = ["MemoirConfig", "ConfigError", "PROMPT_FORMATS", "DTYPES"]
