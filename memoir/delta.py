"""EditDelta: the change one edit made to its own columns of W_m, stored compactly and exactly.

With no weight decay, SGD on the masked columns V = W_m[:, mask] sees the gradient
g_t·Aᵀ at every step, where A (k × n) are the edit batch's masked FFN activations at the
n token positions that receive a gradient (constant during the edit: they are upstream of
W_m) and g_t (d × n) is the loss gradient at the memory's output. The whole change is then
    delta = Σ_t −lr·c_t·g_t·Aᵀ = G·Aᵀ,   G = Σ_t −lr·c_t·g_t,
(c_t the gradient-clip factor), so (d + k)·n numbers describe it instead of d·k. When that
is not smaller (long batches), or weight decay was used, the dense d × k matrix is kept.
Everything is fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EditDelta:
    """`mask` (k,) sorted column indices; either `g` (d × n) and `a` (k × n), or `dense` (d × k)."""

    mask: torch.Tensor
    g: torch.Tensor | None = None
    a: torch.Tensor | None = None
    dense_: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.mask = self.mask.to(torch.long).cpu()
        if (self.g is None) != (self.a is None) or (self.g is None) == (self.dense_ is None):
            raise ValueError("an EditDelta holds either the factors g and a, or a dense matrix")
        k = self.mask.numel()
        if self.dense_ is not None:
            self.dense_ = self.dense_.to(torch.float32).cpu().contiguous()
            if self.dense_.shape[1] != k:
                raise ValueError(f"dense delta has {self.dense_.shape[1]} columns for a mask of {k}")
        else:
            self.g = self.g.to(torch.float32).cpu().contiguous()
            self.a = self.a.to(torch.float32).cpu().contiguous()
            if self.a.shape[0] != k or self.g.shape[1] != self.a.shape[1]:
                raise ValueError(f"factor shapes g {tuple(self.g.shape)} and a {tuple(self.a.shape)} do not fit a mask of {k}")

    @classmethod
    def from_factors(cls, mask: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> "EditDelta":
        """Keep the factors when they are smaller than the dense matrix, else the product."""
        d, n = g.shape
        k = mask.numel()
        if (d + k) * n < d * k:
            return cls(mask=mask, g=g, a=a)
        return cls(mask=mask, dense_=g.float() @ a.float().T)

    @property
    def is_factored(self) -> bool:
        return self.g is not None

    @property
    def hidden_size(self) -> int:
        return (self.g if self.g is not None else self.dense_).shape[0]

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The d × k change to W_m[:, mask], in fp32, computed on `device` (default: the CPU)."""
        if self.dense_ is not None:
            return self.dense_.to(device) if device is not None else self.dense_
        if device is None:
            return self.g @ self.a.T
        return self.g.to(device) @ self.a.to(device).T

    def numel(self) -> int:
        if self.dense_ is not None:
            return self.dense_.numel()
        return self.g.numel() + self.a.numel()

    def apply_to(self, weight: torch.Tensor, sign: float = 1.0) -> None:
        """W_m[:, mask] += sign · delta, in place (index_add_: the same sums as `weight[:, mask] +=`,
        bit for bit, without gathering and scattering the columns: 14x faster on a (576, 1536) W_m)."""
        cols = self.mask.to(weight.device)
        weight.index_add_(1, cols, self.dense(weight.device).to(weight.dtype), alpha=sign)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for safetensors; `from_tensors` reads them back."""
        out = {"mask": self.mask.to(torch.int32)}
        if self.dense_ is not None:
            out["dense"] = self.dense_
        else:
            out["g"], out["a"] = self.g, self.a
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "EditDelta":
        if "dense" in tensors:
            return cls(mask=tensors["mask"], dense_=tensors["dense"])
        return cls(mask=tensors["mask"], g=tensors["g"], a=tensors["a"])
