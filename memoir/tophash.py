"""TopHash: the sparse, prompt-dependent column mask of MEMOIR, and the index of stored masks."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch


def make_permutation(size: int, seed: int) -> torch.Tensor:
    """The fixed random permutation π of 0..size-1, reproducible from its seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)


def prompt_features(acts: torch.Tensor, prompt_mask: torch.Tensor | None, background: torch.Tensor) -> torch.Tensor:
    """Mean FFN activation over each sequence's prompt tokens, minus the background mean μ.

    acts (B, T, D); prompt_mask (B, T), true on prompt tokens (None: every position). Returns (B, D) fp32.
    """
    acts = acts.float()
    if prompt_mask is None:
        mean = acts.mean(dim=1)
    else:
        weights = prompt_mask.to(device=acts.device, dtype=acts.dtype)
        count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = torch.bmm(weights.unsqueeze(1), acts).squeeze(1) / count  # 20x faster than einsum on CPU
    return mean - background.to(device=acts.device, dtype=torch.float32)


def topk_columns(features: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """The k columns of each row's mask: top-k of |feature|, mapped through π, sorted. (B, D) → (B, k)."""
    top = features.abs().topk(k, dim=-1).indices
    return permutation.to(top.device)[top].sort(dim=-1).values


def dense_masks(columns: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, k) column indices → (B, size) 0/1 rows."""
    out = torch.zeros(columns.shape[0], size, dtype=dtype, device=columns.device)
    return out.scatter_(1, columns, 1.0)


def fit_threshold(masks: torch.Tensor, k: int, capacity: int, false_retrievals: float) -> dict[str, float]:
    """A retrieval threshold fitted to a model from the masks of unrelated prompts (B, D) 0/1.

    Two unrelated prompts' masks overlap by chance: the pairs among `masks` give the mean and
    spread of that overlap ratio (with fewer than 3 prompts, those of two random k-of-D masks). A
    query is compared with every stored mask and takes the best, so the threshold must clear the
    best of `capacity` chance overlaps: it is the ratio a chance overlap exceeds with probability
    `false_retrievals / capacity` under a normal fit, mean + z·sd. Returns the threshold and the
    statistics it came from."""
    size = masks.shape[1]
    if masks.shape[0] >= 3:
        ratios = (masks.float() @ masks.float().T) / k
        upper = torch.triu_indices(masks.shape[0], masks.shape[0], 1)
        pairs = ratios[upper[0], upper[1]]
        mean, sd, most, count = float(pairs.mean()), float(pairs.std()), float(pairs.max()), int(pairs.numel())
    else:  # hypergeometric: k draws from D columns of which k are the other mask's
        share = k / size
        mean, sd, most, count = share, math.sqrt(share * (1 - share) * (size - k) / max(1, size - 1) / k), 0.0, 0
    z = NormalDist().inv_cdf(1.0 - false_retrievals / capacity)
    threshold = min(1.0, round(mean + max(z, 0.0) * sd, 4))
    return {"threshold": threshold, "chance_mean": round(mean, 4), "chance_sd": round(sd, 4),
            "chance_max": round(most, 4), "pairs": count, "capacity": capacity,
            "false_retrievals": false_retrievals, "z": round(z, 3)}


class MaskIndex:
    """Each distinct stored mask once, as a row of one packed 0/1 matrix, with the live edits using it.

    Overlap of a batch of masks with every stored mask is one matrix product. The rows live in a
    buffer that doubles when full, so adding a mask is amortised O(size). Removing an edit drops
    its mask only when no other live edit uses the same one; later rows move up one, so the rows
    stay in insertion order (ties in `best` go to the earliest stored mask).
    """

    def __init__(self, size: int, k: int, device: torch.device | str = "cpu") -> None:
        self.size, self.k = size, k
        self.device = torch.device(device)
        self._buffer = torch.zeros(0, size, dtype=torch.float32, device=self.device)
        self._keys: list[tuple[int, ...]] = []
        self._row_of_key: dict[tuple[int, ...], int] = {}
        self._edits: list[set[int]] = []
        self._row_of_edit: dict[int, int] = {}

    def __len__(self) -> int:
        """Number of distinct masks."""
        return len(self._keys)

    @property
    def matrix(self) -> torch.Tensor:
        """The stored masks, (distinct masks × size) 0/1 fp32: a view of the live rows."""
        return self._buffer[: len(self._keys)]

    @property
    def edit_count(self) -> int:
        return len(self._row_of_edit)

    def __contains__(self, edit_id: int) -> bool:
        return edit_id in self._row_of_edit

    def add(self, edit_id: int, columns: torch.Tensor) -> int:
        if edit_id in self._row_of_edit:
            raise KeyError(f"edit {edit_id} is already in the index")
        key = tuple(int(c) for c in columns.flatten().sort().values.tolist())
        if len(key) != self.k:
            raise ValueError(f"a mask has {self.k} columns, got {len(key)}")
        if key[0] < 0 or key[-1] >= self.size:
            raise ValueError(f"mask columns must lie in 0..{self.size - 1}")
        row = self._row_of_key.get(key)
        if row is None:
            row = len(self._keys)
            if row == self._buffer.shape[0]:
                self._grow(max(16, 2 * row))
            self._buffer[row].index_fill_(0, torch.tensor(key, device=self.device), 1.0)
            self._keys.append(key)
            self._row_of_key[key] = row
            self._edits.append(set())
        self._edits[row].add(edit_id)
        self._row_of_edit[edit_id] = row
        return row

    def _grow(self, capacity: int) -> None:
        buffer = torch.zeros(capacity, self.size, dtype=torch.float32, device=self.device)
        buffer[: len(self._keys)] = self.matrix
        self._buffer = buffer

    def remove(self, edit_id: int) -> None:
        row = self._row_of_edit.pop(edit_id)
        self._edits[row].discard(edit_id)
        if self._edits[row]:
            return
        count = len(self._keys)
        key = self._keys.pop(row)
        del self._row_of_key[key]
        self._edits.pop(row)
        self._buffer[row : count - 1] = self._buffer[row + 1 : count].clone()
        self._buffer[count - 1].zero_()
        for later in range(row, count - 1):
            self._row_of_key[self._keys[later]] = later
            for edit in self._edits[later]:
                self._row_of_edit[edit] = later

    def columns(self, row: int) -> torch.Tensor:
        return torch.tensor(self._keys[row], dtype=torch.long)

    def edits(self, row: int) -> set[int]:
        return set(self._edits[row])

    def row_of(self, edit_id: int) -> int:
        return self._row_of_edit[edit_id]

    def masks(self) -> dict[int, torch.Tensor]:
        """Every live edit's mask (edit id → sorted columns)."""
        return {edit: self.columns(row) for edit, row in self._row_of_edit.items()}

    def usage(self) -> dict[tuple[int, ...], int]:
        """Each distinct mask with the count of live edits using it."""
        return {key: len(edits) for key, edits in zip(self._keys, self._edits)}

    def best(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For (B, size) 0/1 query masks: the best stored row per query and its overlap ratio |m ∩ m_e| / k."""
        if not self._keys:
            empty = torch.full((query.shape[0],), -1, dtype=torch.long, device=query.device)
            return empty, torch.zeros(query.shape[0], device=query.device)
        overlap = query.to(self._buffer.dtype) @ self.matrix.T
        ratio, row = (overlap / self.k).max(dim=-1)
        return row, ratio

    def to(self, device: torch.device | str) -> "MaskIndex":
        self.device = torch.device(device)
        self._buffer = self._buffer.to(self.device)
        return self
