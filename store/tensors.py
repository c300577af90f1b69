"""The torch side of the store: EditDelta / MemoryState <-> safetensors bytes, and rebuilding W_m.

Imported only by the store methods that take or return torch objects, so that the ledger's
read-only views (`memoir ledger ...`) never load torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from memoir.delta import EditDelta
from memoir.state import MemoryMismatchError, MemoryState, ModelIdentity
from memoir.tophash import PackedMasks
from store.checkpoints import MASK_BITS, MEMBERS
from store.files import sha256_bytes
from store.blobs import CorruptFileError
from store.records import StoreError


def read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if sha256_bytes(data) != sha256:
        raise CorruptFileError(f"{path}: content does not match its recorded sha256 {sha256[:12]}…")
    return data


def delta_bytes(delta: EditDelta, metadata: dict[str, Any]) -> bytes:
    """The same delta gives the same bytes in every process: the metadata is one key holding
    sorted JSON (safetensors writes several metadata keys in a per-process hash order)."""
    return save_bytes(delta.tensors(), metadata={"memoir": json.dumps(metadata, sort_keys=True)})


def delta_from_bytes(data: bytes) -> EditDelta:
    return EditDelta.from_tensors(load_bytes(data))


def state_bytes(state: MemoryState) -> bytes:
    """The memory's fixed tensors: the permutation π and the background mean μ."""
    tensors = state.tensors(with_weight=False)
    return save_bytes({"permutation": tensors["permutation"], "background": tensors["background"]})


def checkpoint_bytes(weight: torch.Tensor, held: list[tuple[int, bytes, str]], size: int, k: int,
                     version: int) -> bytes:
    """W_m (fp32), the retrieval index it goes with (edit ids and their masks as the ledger's D-bit
    bitmaps, `mask_bits`) and the delta each edit held (sha256, 32 bytes a row), from (edit id,
    bitmap, delta sha256) rows. Files written before `mask_bits` hold `masks`, k int32 columns a row."""
    import numpy as np

    held = sorted(held)
    width = (size + 7) // 8
    if any(len(row[1]) != width for row in held):
        raise StoreError(f"the masks of the edits to checkpoint are not all {size}-bit bitmaps")
    bits = np.frombuffer(b"".join(row[1] for row in held), dtype=np.uint8).reshape(len(held), width)
    if not bool((np.bitwise_count(bits).sum(axis=1, dtype=np.int64) == k).all()):
        raise StoreError(f"the masks of the edits to checkpoint do not all have {k} columns")
    tensors = {"weight": weight.detach().to(device="cpu", dtype=torch.float32).contiguous(),
               "mask_edit_ids": torch.tensor([row[0] for row in held], dtype=torch.int64),
               MASK_BITS: torch.from_numpy(bits.copy()),
               MEMBERS: torch.frombuffer(bytearray(b"".join(bytes.fromhex(row[2]) for row in held)),
                                         dtype=torch.uint8).reshape(len(held), 32)}
    return save_bytes(tensors, metadata={"version": str(version)})


def load_checkpoint(data: bytes) -> dict[str, torch.Tensor]:
    return load_bytes(data)


def is_empty(state: MemoryState) -> bool:
    return not state.masks and not bool(state.weight.count_nonzero())


def build_state(meta: dict[str, Any], fixed: bytes, weight: torch.Tensor,
                masks: Mapping[int, bytes], expect: ModelIdentity | None) -> MemoryState:
    """MemoryState from the memory's metadata and fixed tensors, W_m and the applied masks as the
    ledger keeps them (edit id -> D-bit bitmap): packed as they are, never unpacked to columns."""
    packed = PackedMasks.from_bitmaps(masks, meta["model"]["intermediate_size"])
    state = MemoryState.from_parts(meta, {**load_bytes(fixed), "weight": weight}, masks=packed)
    if expect is not None:
        problems = state.model.mismatches(expect)
        if problems:
            raise MemoryMismatchError("the stored memory does not fit this model: " + "; ".join(problems))
    return state


def delta_for(data: bytes, device: torch.device) -> EditDelta:
    """A delta file's EditDelta as W_m on `device` adds it: multiplied out already when W_m is on
    the CPU (the product then runs in the thread that read the file), factored for an accelerator."""
    delta = delta_from_bytes(data)
    if device.type == "cpu" and delta.is_factored:
        return EditDelta(mask=delta.mask, dense_=delta.dense())
    return delta


def rebuild_weight(shape: tuple[int, int], checkpoint: dict[str, torch.Tensor] | None,
                   subtract: Iterable[EditDelta], add: Iterable[EditDelta], device: torch.device) -> torch.Tensor:
    """A checkpoint's W_m (or zeros), minus the deltas it holds that are not wanted, plus the
    wanted deltas it lacks (in the order they were applied: the same sums as the live memory),
    built on `device`: a worker rebuilds on its own device, where it applied them."""
    weight = (checkpoint["weight"].to(device) if checkpoint is not None
              else torch.zeros(shape, dtype=torch.float32, device=device))
    if tuple(weight.shape) != tuple(shape):
        raise CorruptFileError(f"checkpoint W_m has shape {tuple(weight.shape)}, the memory {tuple(shape)}")
    for delta in subtract:
        delta.apply_to(weight, -1.0)
    for delta in add:
        delta.apply_to(weight, 1.0)
    return weight
