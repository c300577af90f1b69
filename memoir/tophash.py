"""TopHash: the sparse, prompt-dependent column mask of MEMOIR, and the index of stored masks."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, MutableMapping
from statistics import NormalDist
from typing import Iterator, Sequence

import numpy as np
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


WORD_BITS = 64


def word_count(size: int) -> int:
    """int64 words holding one D-bit mask."""
    return (size + WORD_BITS - 1) // WORD_BITS


def pack_columns(columns: torch.Tensor, size: int) -> torch.Tensor:
    """(B, k) column indices → (B, W) int64 words on the CPU: bit c of a row is bit c % 64 of word c // 64.

    The same bits, byte for byte on a little-endian machine, as the ledger's D-bit little-endian
    bitmaps (store.records.encode_mask) padded to whole words."""
    columns = columns.detach().to("cpu", torch.long)
    bits = np.zeros((columns.shape[0], word_count(size) * WORD_BITS), dtype=np.bool_)
    np.put_along_axis(bits, columns.numpy(), True, axis=1)
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int64))


def pack_bitmaps(bitmaps: Sequence[bytes], size: int) -> torch.Tensor:
    """D-bit little-endian bitmaps (the ledger's mask column) → (n, W) int64 words."""
    width = word_count(size) * 8
    out = np.zeros((len(bitmaps), width), dtype=np.uint8)
    for row, bitmap in enumerate(bitmaps):
        if len(bitmap) != (size + 7) // 8:
            raise ValueError(f"a {size}-column mask bitmap has {(size + 7) // 8} bytes, got {len(bitmap)}")
        out[row, : len(bitmap)] = np.frombuffer(bitmap, dtype=np.uint8)
    return torch.from_numpy(out.view(np.int64))


def unpack(words: torch.Tensor, size: int) -> torch.Tensor:
    """(m, W) int64 words → (m, size) bool rows, on the words' device."""
    if words.device.type == "cpu":
        raw = np.ascontiguousarray(words.numpy()).view(np.uint8)
        return torch.from_numpy(np.unpackbits(raw, axis=1, count=size, bitorder="little").view(np.bool_))
    shifts = torch.arange(WORD_BITS, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(words.shape[0], -1)[:, :size]


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word, with tensor ops only (any device): per-byte counts, then summed."""
    m1, m2, m4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F
    x = words - ((words >> 1) & m1)
    x = (x & m2) + ((x >> 2) & m2)
    x = (x + (x >> 4)) & m4  # each byte holds its own count (<= 8)
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 8).sum(-1, dtype=torch.int32)


class PackedMasks(MutableMapping):
    """Edit id → its mask's sorted columns (k,), kept as packed D-bit rows: (n, W) int64, D/8 bytes a mask.

    A mapping, as MemoryState.masks was a dict of column tensors; a mask's columns are unpacked
    when asked for, and packed when set. `from_bitmaps` takes the ledger's bitmaps as they are."""

    def __init__(self, ids: Sequence[int], words: torch.Tensor, size: int) -> None:
        self.ids = [int(i) for i in ids]
        self.words = words.detach().to("cpu", torch.int64).contiguous()
        self.size = size
        if self.words.shape != (len(self.ids), word_count(size)):
            raise ValueError(f"{len(self.ids)} masks of {size} columns need ({len(self.ids)}, {word_count(size)}) "
                             f"words, got {tuple(self.words.shape)}")
        self._row = {edit: row for row, edit in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("an edit id appears twice among the masks")

    @classmethod
    def from_columns(cls, ids: Sequence[int], columns: torch.Tensor, size: int) -> "PackedMasks":
        """From (n, k) column indices (each row k distinct columns of 0..size-1)."""
        if not len(ids):
            return cls([], torch.zeros(0, word_count(size), dtype=torch.int64), size)
        columns = columns.reshape(len(ids), -1).to(torch.long)
        if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= size):
            raise ValueError(f"mask columns must lie in 0..{size - 1}")
        packed = pack_columns(columns, size)
        counts = np.bitwise_count(packed.numpy().view(np.uint64)).sum(1)
        if columns.numel() and not bool((counts == columns.shape[1]).all()):
            raise ValueError("a mask lists the same column twice")
        return cls(ids, packed, size)

    @classmethod
    def from_bitmaps(cls, bitmaps: Mapping[int, bytes], size: int) -> "PackedMasks":
        ids = list(bitmaps)
        return cls(ids, pack_bitmaps([bitmaps[i] for i in ids], size), size)

    def __getitem__(self, edit_id: int) -> torch.Tensor:
        row = self._row[int(edit_id)]
        return unpack(self.words[row : row + 1], self.size)[0].nonzero().flatten()

    def __setitem__(self, edit_id: int, columns: torch.Tensor) -> None:
        words = pack_columns(torch.as_tensor(columns).reshape(1, -1), self.size)
        row = self._row.get(int(edit_id))
        if row is None:
            self._row[int(edit_id)] = len(self.ids)
            self.ids.append(int(edit_id))
            self.words = torch.cat([self.words, words])
        else:
            self.words[row] = words[0]

    def __delitem__(self, edit_id: int) -> None:
        row = self._row.pop(int(edit_id))
        del self.ids[row]
        self.words = torch.cat([self.words[:row], self.words[row + 1 :]])
        self._row = {edit: n for n, edit in enumerate(self.ids)}

    def clear(self) -> None:
        self.ids, self._row = [], {}
        self.words = torch.zeros(0, word_count(self.size), dtype=torch.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def words_of(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), W) packed masks of `ids`."""
        return self.words[torch.tensor([self._row[int(i)] for i in ids], dtype=torch.long)]

    def columns(self, ids: Sequence[int], k: int, chunk: int = 1024) -> torch.Tensor:
        """(len(ids), k) int32 columns of the masks of `ids`, unpacked a chunk at a time."""
        out = torch.zeros(len(ids), k, dtype=torch.int32)
        rows = torch.tensor([self._row[int(i)] for i in ids], dtype=torch.long)
        for start in range(0, len(ids), chunk):
            dense = unpack(self.words[rows[start : start + chunk]], self.size)
            cols = dense.nonzero()[:, 1]
            if cols.numel() != dense.shape[0] * k:
                raise ValueError(f"a mask does not have {k} columns")
            out[start : start + chunk] = cols.view(-1, k).to(torch.int32)
        return out


class MaskIndex:
    """Each distinct stored mask once, packed as D bits (D/8 bytes), with the live edits using it.

    The masks are the columns of one (W, capacity) int64 matrix (W = ⌈D/64⌉ words a mask), so the
    overlap of a query with every stored mask is, word by word, an AND and a population count
    along contiguous rows: |m ∩ m_e| exactly, without ever forming dense (n, D) rows. The matrix
    grows geometrically (×1.25), so adding a mask is amortised O(W); `add_many` fills it in one go.
    Removing an edit drops its mask only when no other live edit uses the same one; later masks
    move up one, so they stay in insertion order (ties in `best` go to the earliest stored mask).
    A mask is found again by a 128-bit digest of its words.
    """

    GROWTH = 1.25
    _CHUNK = 16  # words per pass of the CPU overlap: (16, n) scratch rows stay in cache

    def __init__(self, size: int, k: int, device: torch.device | str = "cpu") -> None:
        self.size, self.k = size, k
        self.words = word_count(size)
        self.device = torch.device(device)
        self._bits = torch.zeros(self.words, 0, dtype=torch.int64, device=self.device)
        # Kept lean (~200 bytes a mask beside its D/8 bytes of bits): a mask's 16-byte digest finds
        # its row; an edit finds its mask's digest; a row lists its edit (an int) or edits (a set).
        self._row_of_key: dict[bytes, int] = {}
        self._key_of_edit: dict[int, bytes] = {}
        self._edits: list[int | set[int]] = []
        self._scratch = threading.local()

    def __getstate__(self) -> dict:  # copies and pickles leave the per-thread scratch buffers behind
        return {key: value for key, value in self.__dict__.items() if key != "_scratch"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scratch = threading.local()

    def __len__(self) -> int:
        """Number of distinct masks."""
        return len(self._edits)

    @property
    def capacity(self) -> int:
        return self._bits.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed masks (the allocated capacity)."""
        return self._bits.numel() * self._bits.element_size()

    @property
    def packed(self) -> torch.Tensor:
        """The stored masks, (distinct masks × W) int64 words (a copy)."""
        return self._bits[:, : len(self)].T.contiguous()

    @property
    def matrix(self) -> torch.Tensor:
        """The stored masks as (distinct masks × size) 0/1 fp32 rows: O(n·D), for checks and small
        indexes only; retrieval never forms it."""
        return self.dense_rows(torch.arange(len(self), device=self.device))

    @property
    def edit_count(self) -> int:
        return len(self._key_of_edit)

    def __contains__(self, edit_id: int) -> bool:
        return edit_id in self._key_of_edit

    def edit_ids(self) -> list[int]:
        return list(self._key_of_edit)

    # -- adding and removing ---------------------------------------------------------------------
    def add(self, edit_id: int, columns: torch.Tensor) -> int:
        columns = columns.detach().flatten().to("cpu", torch.long)
        if columns.numel() != self.k:
            raise ValueError(f"a mask has {self.k} columns, got {columns.numel()}")
        if int(columns.min()) < 0 or int(columns.max()) >= self.size:
            raise ValueError(f"mask columns must lie in 0..{self.size - 1}")
        return self.add_many([edit_id], pack_columns(columns.unsqueeze(0), self.size))[0]

    def add_many(self, edit_ids: Sequence[int], words: torch.Tensor) -> list[int]:
        """Add edits with their packed masks (n, W) int64, in order (each row k columns of 0..D-1);
        returns their rows. All or nothing: a bad row leaves the index as it was."""
        ids = [int(i) for i in edit_ids]
        words = words.detach().to("cpu", torch.int64).reshape(len(ids), self.words).contiguous()
        host = words.numpy()
        if len(set(ids)) != len(ids) or any(i in self._key_of_edit for i in ids):
            raise KeyError(f"edits {sorted(i for i in ids if i in self._key_of_edit or ids.count(i) > 1)} "
                           "are already in the index")
        if len(ids) and not bool((np.bitwise_count(host.view(np.uint64)).sum(1) == self.k).all()):
            raise ValueError(f"a mask has {self.k} distinct columns")
        tail = self.size % WORD_BITS
        if len(ids) and tail and bool((host[:, -1].view(np.uint64) >> np.uint64(tail)).any()):
            raise ValueError(f"mask columns must lie in 0..{self.size - 1}")
        new: list[int] = []  # rows of `words` that bring a mask not stored yet
        pending: dict[bytes, int] = {}
        rows, digests = [], []
        for n in range(len(ids)):
            digest = hashlib.blake2b(host[n].tobytes(), digest_size=16).digest()
            row = self._row_of_key.get(digest, pending.get(digest))
            if row is None:
                row = pending[digest] = len(self) + len(new)
                new.append(n)
            digests.append(digest)
            rows.append(row)
        count = len(self) + len(new)
        if count > self.capacity:
            self._grow(count if len(ids) > 1 else max(16, math.ceil(self.capacity * self.GROWTH), count))
        if new:
            self._bits[:, len(self) : count] = words[new].T.to(self.device)
        for n in new:
            self._row_of_key[digests[n]] = rows[n]
            self._edits.append(ids[n])
        fresh = set(new)
        for n, (edit_id, row) in enumerate(zip(ids, rows)):
            if n not in fresh:  # a mask stored already: one more edit uses it
                held = self._edits[row]
                self._edits[row] = {held, edit_id} if isinstance(held, int) else held | {edit_id}
            self._key_of_edit[edit_id] = digests[n]
        return rows

    def _grow(self, capacity: int) -> None:
        bits = torch.zeros(self.words, capacity, dtype=torch.int64, device=self.device)
        bits[:, : len(self)] = self._bits[:, : len(self)]
        self._bits = bits

    def remove(self, edit_id: int) -> None:
        digest = self._key_of_edit.pop(edit_id)
        row = self._row_of_key[digest]
        held = self._edits[row]
        if isinstance(held, set):
            rest = held - {edit_id}
            self._edits[row] = next(iter(rest)) if len(rest) == 1 else rest
            return
        count = len(self)
        del self._row_of_key[digest]
        self._edits.pop(row)
        later = self._bits[:, row + 1 : count].T.cpu().numpy()  # the masks that move up one
        for n in range(later.shape[0]):
            self._row_of_key[hashlib.blake2b(later[n].tobytes(), digest_size=16).digest()] = row + n
        self._bits[:, row : count - 1] = self._bits[:, row + 1 : count].clone()
        self._bits[:, count - 1].zero_()

    # -- reading ---------------------------------------------------------------------------------
    def columns(self, row: int) -> torch.Tensor:
        return self.dense_rows(torch.tensor([row]))[0].nonzero().flatten().cpu()

    def dense_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(rows), size) 0/1 rows of the stored masks `rows`, on the index's device."""
        rows = rows.to(device=self.device, dtype=torch.long)
        return unpack(self._bits[:, rows].T.contiguous(), self.size).to(dtype)

    def edits(self, row: int) -> set[int]:
        held = self._edits[row]
        return {held} if isinstance(held, int) else set(held)

    def row_of(self, edit_id: int) -> int:
        return self._row_of_key[self._key_of_edit[edit_id]]

    def masks(self) -> PackedMasks:
        """Every live edit's mask (edit id → sorted columns), packed: D/8 bytes an edit."""
        ids = list(self._key_of_edit)
        rows = torch.tensor([self._row_of_key[key] for key in self._key_of_edit.values()], dtype=torch.long,
                            device=self.device)
        return PackedMasks(ids, self._bits[:, rows].T.cpu(), self.size)

    def usage(self) -> dict[tuple[int, ...], int]:
        """Each distinct mask with the count of live edits using it."""
        return {tuple(self.columns(row).tolist()): len(self.edits(row)) for row in range(len(self))}

    # -- retrieval -------------------------------------------------------------------------------
    def pack(self, columns: torch.Tensor) -> torch.Tensor:
        """(B, k) query columns → (B, W) words, on the index's device."""
        return pack_columns(columns, self.size).to(self.device)

    def overlaps(self, query: torch.Tensor) -> torch.Tensor:
        """|m ∩ m_e| of (B, W) packed query masks with every stored mask: (B, n) int32."""
        query = query.to(device=self.device, dtype=torch.int64)
        if self.device.type != "cpu":
            return self._overlaps_torch(query)
        return self._overlaps_numpy(query)

    def _overlaps_torch(self, query: torch.Tensor) -> torch.Tensor:
        """Any device: AND, then a population count in tensor ops, a few words at a time."""
        count = len(self)
        out = torch.zeros(query.shape[0], count, dtype=torch.int32, device=self.device)
        for start in range(0, self.words, self._CHUNK):  # (B, chunk, n) at a time
            block = query[:, start : start + self._CHUNK, None] & self._bits[None, start : start + self._CHUNK, :count]
            out += _popcount(block).sum(1, dtype=torch.int32)
        return out

    def _overlaps_numpy(self, query: torch.Tensor) -> torch.Tensor:
        """The CPU: numpy's AND and hardware population count (np.bitwise_count) on (16, n) blocks
        of words that stay in cache, summed down the words."""
        count = len(self)
        stored = self._bits.numpy()[:, :count].view(np.uint64)  # (W, n): word w of every mask, contiguous
        queries = np.ascontiguousarray(query.numpy()).view(np.uint64)
        chunk = self._CHUNK
        scratch = self._scratch
        if getattr(scratch, "n", -1) != count:
            scratch.n = count
            scratch.both = np.empty((chunk, count), dtype=np.uint64)
            scratch.bits = np.empty((chunk, count), dtype=np.uint8)
            scratch.part = np.empty(count, dtype=np.uint16)
        both, bits, part = scratch.both, scratch.bits, scratch.part
        out = np.zeros((queries.shape[0], count), dtype=np.int32)
        for start in range(0, self.words, chunk):  # each block of stored words is read from memory once
            end = min(self.words, start + chunk)
            rows = end - start
            for b in range(queries.shape[0]):
                np.bitwise_and(stored[start:end], queries[b, start:end, None], out=both[:rows])
                np.bitwise_count(both[:rows], out=bits[:rows])
                np.sum(bits[:rows], axis=0, dtype=np.uint16, out=part)  # <= 16 · 64 per block: no overflow
                np.add(out[b], part, out=out[b])
        return torch.from_numpy(out)

    def best_words(self, query: torch.Tensor, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For (B, W) packed query masks: the best stored row per query and its overlap ratio |m ∩ m_e| / k
        (the earliest row on a tie); `exclude`: a row that takes no part (its overlap counts as -1)."""
        if not len(self):
            empty = torch.full((query.shape[0],), -1, dtype=torch.long, device=self.device)
            return empty, torch.zeros(query.shape[0], device=self.device)
        overlap = self.overlaps(query).float()
        if exclude is not None:
            overlap[:, exclude] = -1.0
        ratio, row = (overlap / self.k).max(dim=-1)
        return row, ratio

    def best_columns(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`best_words` for (B, k) query columns."""
        return self.best_words(self.pack(columns))

    def best(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For (B, size) 0/1 query masks: the best stored row per query and its overlap ratio |m ∩ m_e| / k."""
        bits = (query != 0).detach().cpu().numpy()
        padded = np.zeros((bits.shape[0], self.words * WORD_BITS), dtype=np.bool_)
        padded[:, : bits.shape[1]] = bits
        words = torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").view(np.int64))
        return self.best_words(words)

    def to(self, device: torch.device | str) -> "MaskIndex":
        self.device = torch.device(device)
        self._bits = self._bits.to(self.device)
        return self
