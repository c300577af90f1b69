"""The packed mask index (D bits a mask, overlaps by AND + population count) decides exactly as the
dense one it replaced (fp32 0/1 rows, overlaps by a matrix product), and old saved memories load."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from memoir import Editor, MemoirConfig, MemoryState
from memoir.tophash import MaskIndex, PackedMasks, _popcount, dense_masks, pack_bitmaps, pack_columns, unpack
from memoir.tinymodel import zsre_records
from store.records import encode_mask

RECORDS = zsre_records()


def dense_best(stored: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code before: (B, D) 0/1 queries @ (n, D) 0/1 fp32 rows, ratio = overlap / k, first max."""
    ratio, row = ((query @ stored.T) / k).max(dim=-1)
    return row, ratio


def random_masks(n: int, size: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(size, generator=gen)[:k].sort().values for _ in range(n)])


@pytest.mark.parametrize("size,k", [(40, 6), (64, 18), (130, 37), (1536, 439)])
def test_packed_overlaps_and_decisions_equal_the_dense_ones(size, k):
    gen = torch.Generator().manual_seed(size)
    stored = random_masks(300, size, k, gen)
    stored[7] = stored[3]  # a shared mask: stored once
    index = MaskIndex(size, k)
    for edit, cols in enumerate(stored):
        index.add(edit, cols[torch.randperm(k, generator=gen)])
    distinct = torch.stack([stored[i] for i in range(len(stored)) if i != 7])
    queries = torch.cat([random_masks(20, size, k, gen), stored[[0, 3, 299]]])
    # near-copies of stored masks: high overlaps and ties between rows
    near = stored[[5, 5, 6]].clone()
    near[:, 0] = torch.tensor([c for c in range(size) if c not in near[0].tolist()][0])
    queries = torch.cat([queries, near.sort(dim=1).values])
    dense_query = dense_masks(queries, size)
    want_rows, want_ratios = dense_best(dense_masks(distinct, size), dense_query, k)
    rows, ratios = index.best_columns(queries)
    assert torch.equal(rows, want_rows) and torch.equal(ratios, want_ratios)
    assert torch.equal(index.best(dense_query)[0], want_rows)
    overlaps = (dense_query @ dense_masks(distinct, size).T).to(torch.int32)
    assert torch.equal(index.overlaps(index.pack(queries)), overlaps)
    assert torch.equal(index._overlaps_torch(index.pack(queries)), overlaps)  # the path other devices take
    assert torch.equal(index.dense_rows(rows), dense_masks(distinct, size)[want_rows])


def test_ties_go_to_the_earliest_mask_and_exclusion_counts_minus_one():
    index = MaskIndex(8, 2)
    for edit, cols in enumerate([(0, 1), (0, 2), (0, 3)]):
        index.add(edit, torch.tensor(cols))
    rows, ratios = index.best_columns(torch.tensor([[0, 5], [2, 3]]))
    assert rows.tolist() == [0, 1] and ratios.tolist() == [0.5, 0.5]
    rows, ratios = index.best_words(index.pack(torch.tensor([[0, 1]])), exclude=0)
    assert rows.tolist() == [1] and ratios.tolist() == [0.5]
    alone = MaskIndex(8, 2)
    alone.add(0, torch.tensor([0, 1]))
    rows, ratios = alone.best_words(alone.pack(torch.tensor([[0, 1]])), exclude=0)
    assert ratios.tolist() == [-0.5]  # as the dense code's overlap of -1: below any threshold


def test_a_copy_is_independent_and_decides_the_same():
    import copy
    import pickle

    index = MaskIndex(100, 5)
    for edit in range(4):
        index.add(edit, torch.arange(edit, edit + 5))
    query = torch.tensor([[1, 2, 3, 4, 5]])  # edit 1 exactly; edits 0 and 2 share 4 columns
    index.best_columns(query)  # scratch buffers exist now
    clone = copy.deepcopy(index)
    clone.remove(1)
    assert index.best_columns(query)[0].tolist() == [1] and clone.best_columns(query)[0].tolist() == [0]
    assert pickle.loads(pickle.dumps(index)).best_columns(query)[1].tolist() == [1.0]


def test_popcount_of_every_bit_pattern_edge():
    words = torch.tensor([0, -1, 1, -(2**63), 2**63 - 1, 0x5555555555555555, -0x5555555555555556], dtype=torch.int64)
    want = [bin(int(w) & (2**64 - 1)).count("1") for w in words.tolist()]
    assert _popcount(words).tolist() == want


def test_bitmaps_columns_and_unpacking_agree():
    gen = torch.Generator().manual_seed(1)
    for size in (8, 63, 64, 65, 1536):
        columns = random_masks(5, size, max(1, size // 3), gen)
        packed = pack_columns(columns, size)
        assert packed.shape == (5, (size + 63) // 64)
        bitmaps = [encode_mask(c.tolist(), size) for c in columns]
        assert torch.equal(pack_bitmaps(bitmaps, size), packed)  # the ledger's bytes are the index's words
        assert torch.equal(unpack(packed, size), dense_masks(columns, size, torch.bool))


def test_bad_masks_are_refused_and_change_nothing():
    index = MaskIndex(70, 3)
    index.add(0, torch.tensor([1, 2, 3]))
    before = (index.packed.clone(), index.edit_ids(), index.capacity)
    for bad in ([1, 2], [1, 2, 70], [-1, 2, 3], [4, 4, 5]):
        with pytest.raises(ValueError):
            index.add(9, torch.tensor(bad))
    with pytest.raises(KeyError):
        index.add(0, torch.tensor([4, 5, 6]))
    words = pack_columns(torch.tensor([[4, 5, 6], [7, 8, 9]]), 70)
    words[1, 1] |= 1 << 7  # column 71: past D in the last word
    with pytest.raises(ValueError):
        index.add_many([10, 11], words)
    assert torch.equal(index.packed, before[0]) and index.edit_ids() == before[1] and index.capacity == before[2]


def test_index_memory_is_the_packed_bits():
    size, k, n = 14336, 4096, 64
    index = MaskIndex(size, k)
    words = pack_columns(random_masks(n, size, k, torch.Generator().manual_seed(2)), size)
    index.add_many(range(n), words)
    assert index.nbytes == n * size // 8  # 1792 bytes a mask, where a dense fp32 row is 57 344
    index.add(n, torch.arange(k))
    assert index.capacity <= max(16, 1.25 * n + 1) and len(index) == n + 1


def test_packed_masks_mapping_round_trips():
    gen = torch.Generator().manual_seed(3)
    columns = random_masks(4, 100, 10, gen)
    masks = PackedMasks.from_columns([5, 1, 9, 3], columns, 100)
    assert list(masks) == [5, 1, 9, 3] and torch.equal(masks[9], columns[2])
    assert torch.equal(masks.columns([1, 3], 10), columns[[1, 3]].to(torch.int32))
    masks[2] = columns[0]
    del masks[5]
    assert list(masks) == [1, 9, 3, 2] and torch.equal(masks[2], columns[0])
    with pytest.raises(ValueError):
        PackedMasks.from_columns([1], torch.tensor([[3, 3, 4]]), 10)


def test_old_saved_memory_loads_and_decides_the_same(tiny_editor, tmp_path):
    """A memory saved with masks as a dict of column tensors (the form before) loads into the packed
    index, retrieves the same rows with the same ratios, and saves the same bytes."""
    editor = tiny_editor
    for record in RECORDS[:4]:
        editor.edit(record["src"], record["alt"], score=False)
    state = editor.state()
    old = MemoryState(**{**state.__dict__, "masks": {i: state.masks[i] for i in state.masks}})
    old.save(tmp_path / "old")
    loaded = MemoryState.load(tmp_path / "old")
    assert isinstance(loaded.masks, PackedMasks)
    assert {i: m.tolist() for i, m in loaded.masks.items()} == {i: m.tolist() for i, m in old.masks.items()}
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "memory.safetensors").read_bytes() == (tmp_path / "old" / "memory.safetensors").read_bytes()

    prompts = [r["src"] for r in RECORDS[:4]] + [r["rephrase"] for r in RECORDS[:4]] + [r["loc"] for r in RECORDS[50:60]]
    batch = editor.batch(prompts)
    memory = editor.memory
    with torch.no_grad():
        from memoir.editor import _activations

        acts = _activations(editor.model, memory, batch)
    decided = memory.decide(acts, batch.prompt_mask)
    columns = memory.columns_for(acts, batch.prompt_mask)
    stored = dense_masks(torch.stack([memory.index.columns(r) for r in range(len(memory.index))]), memory.site.in_features)
    rows, ratios = dense_best(stored, dense_masks(columns, memory.site.in_features), memory.top_k)
    rows = torch.where(ratios >= memory.threshold, rows, torch.full_like(rows, -1))
    assert torch.equal(decided.rows, rows) and torch.equal(decided.ratios, ratios)
    assert (decided.rows[:4] >= 0).all()  # the edited prompts retrieve their edits
    want_masks = torch.zeros_like(decided.masks)
    want_masks[rows >= 0] = stored[rows[rows >= 0]]
    assert torch.equal(decided.masks, want_masks)

    detach_and_reload = Editor.from_state
    from memoir.memory import detach

    detach(editor.model, memory)
    reloaded = detach_and_reload(editor.model, editor.tokenizer, loaded)
    again = reloaded.memory.decide(acts, batch.prompt_mask)
    assert torch.equal(again.rows, decided.rows) and torch.equal(again.ratios, decided.ratios)


@pytest.fixture
def tiny_editor():
    from memoir.sources import load_model

    model, tok, _ = load_model("builtin")
    return Editor.create(model, tok, [r["loc"] for r in RECORDS[400:430]], MemoirConfig(n_iter=3))
