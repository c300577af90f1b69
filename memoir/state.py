"""MemoryState: everything a memory depends on, saved apart from the base model's files.

`memory.json` holds the config, the model's identity, the context prefixes, the background
prompts and the prompt handling; `memory.safetensors` holds π, μ, W_m and the live masks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from memoir.config import MemoirConfig
from memoir.tophash import PackedMasks

FORMAT_VERSION = 1


class MemoryMismatchError(ValueError):
    """A saved memory does not belong to the model it is being loaded onto."""


@dataclass
class ModelIdentity:
    """What a memory was made on; a memory refuses to load onto a model that differs."""

    name_or_path: str
    model_type: str
    module_path: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    revision: str | None = None

    def mismatches(self, other: "ModelIdentity") -> list[str]:
        """The fields that must agree and do not (name and revision may differ: copies move)."""
        checked = ("model_type", "module_path", "hidden_size", "intermediate_size", "num_layers", "vocab_size")
        return [f"{name}: memory has {getattr(self, name)!r}, model has {getattr(other, name)!r}"
                for name in checked if getattr(self, name) != getattr(other, name)]


@dataclass
class MemoryState:
    config: MemoirConfig
    model: ModelIdentity
    permutation: torch.Tensor
    background: torch.Tensor
    context_prefixes: list[str]
    background_prompts: list[str]
    prepend_bos: bool
    weight: torch.Tensor
    masks: Mapping[int, torch.Tensor] = field(default_factory=dict)  # edit id -> sorted columns (a dict, or PackedMasks)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.__dict__,
            "context_prefixes": self.context_prefixes,
            "background_prompts": self.background_prompts,
            "prepend_bos": self.prepend_bos,
        }

    def tensors(self, with_weight: bool = True) -> dict[str, torch.Tensor]:
        ids = sorted(self.masks)
        k = self.config.top_k
        out = {
            "permutation": self.permutation.to(torch.int64).contiguous(),
            "background": self.background.float().contiguous(),
            "mask_edit_ids": torch.tensor(ids, dtype=torch.int64),
            "masks": self._mask_columns(ids, k),
        }
        if with_weight:
            out["weight"] = self.weight.float().contiguous()
        return out

    def _mask_columns(self, ids: list[int], k: int) -> torch.Tensor:
        """(n, k) int32: the saved form of the masks, whichever way they are held in memory."""
        if not ids:
            return torch.zeros(0, k, dtype=torch.int32)
        if isinstance(self.masks, PackedMasks):
            return self.masks.columns(ids, k)
        return torch.stack([self.masks[i].to(torch.int32) for i in ids])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write atomically: a crash leaves the previous save, never a half-written one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp_json = directory / "memory.json.tmp"
        tmp_tensors = directory / "memory.safetensors.tmp"
        tmp_json.write_text(json.dumps(self.metadata(), indent=2, sort_keys=True))
        save_file(self.tensors(), str(tmp_tensors))
        os.replace(tmp_tensors, directory / "memory.safetensors")
        os.replace(tmp_json, directory / "memory.json")
        return directory

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   masks: PackedMasks | None = None) -> "MemoryState":
        """From `memory.json`'s fields and the tensors; `masks` (packed already, e.g. from the
        ledger's bitmaps) stands in for the tensors `mask_edit_ids` and `masks`."""
        if meta.get("format_version") != FORMAT_VERSION:
            raise MemoryMismatchError(f"memory format {meta.get('format_version')} is not {FORMAT_VERSION}")
        config = MemoirConfig.from_dict(meta["config"])
        d, size = meta["model"]["hidden_size"], meta["model"]["intermediate_size"]
        if masks is None:
            masks = PackedMasks.from_columns(tensors["mask_edit_ids"].tolist(), tensors["masks"], size)
        weight = tensors.get("weight", torch.zeros(d, size))
        return cls(
            config=config,
            model=ModelIdentity(**meta["model"]),
            permutation=tensors["permutation"].to(torch.long),
            background=tensors["background"].float(),
            context_prefixes=list(meta["context_prefixes"]),
            background_prompts=list(meta["background_prompts"]),
            prepend_bos=bool(meta["prepend_bos"]),
            weight=weight.float(),
            masks=masks,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MemoryState":
        directory = Path(directory)
        meta = json.loads((directory / "memory.json").read_text())
        return cls.from_parts(meta, load_file(str(directory / "memory.safetensors")))
