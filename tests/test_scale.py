"""Loading, verifying and restarting at scale (issue 15 §2), as behaviour, not timing: loading keeps
the ledger's mask bitmaps packed, verify reads each delta file once and compares masks by digest,
a restarted worker decides as the one before, and its start-up capture for rollbacks is bounded.
The figures are in BENCHMARKS.md (Scale), from benchmarks/bench_restart.py."""

from __future__ import annotations

from collections import Counter

import torch

from memoir import EditDelta, EditResult, MemoirConfig, MemoryState, ModelIdentity
from memoir.tophash import PackedMasks
from store import Store
from store.records import encode_mask
from workers import activations
from workers.runtime import Runtime

D_MODEL, D_FFN, K = 8, 70, 20  # D not a multiple of 64: the last word is partly padding


def make_state() -> MemoryState:
    gen = torch.Generator().manual_seed(0)
    identity = ModelIdentity("synthetic", "llama", "model.layers.1.mlp.down_proj", D_MODEL, D_FFN, 2, 100)
    return MemoryState(MemoirConfig(layer=1, top_k=K), identity, torch.randperm(D_FFN, generator=gen),
                       torch.randn(D_FFN, generator=gen), ["I am"], ["unrelated"], True, torch.zeros(D_MODEL, D_FFN))


def apply_edits(store: Store, count: int, weight: torch.Tensor, shared_every: int = 0) -> None:
    gen = torch.Generator().manual_seed(1)
    mask = None
    for n in range(count):
        edit, _ = store.record_request("m", f"r{n}", f"p{n}", f"t{n}")
        store.mark_applying(edit)
        if mask is None or not shared_every or n % shared_every:
            mask = torch.randperm(D_FFN, generator=gen)[:K].sort().values
        delta = EditDelta(mask=mask, g=torch.randn(D_MODEL, 2, generator=gen), a=torch.randn(K, 2, generator=gen))
        store.mark_applied(edit, EditResult(edit.id, "p", "t", delta, [1.0], 1, 0.1, "u", {"rel": 1.0}))
        delta.apply_to(weight)
        if store.checkpoint_due("m"):
            store.checkpoint("m", weight)


def open_store(tmp_path, count: int, shared_every: int = 0) -> tuple[Store, torch.Tensor]:
    store = Store.open(tmp_path / "store")
    store.create_memory("m", make_state(), "synthetic", checkpoint_every=4)
    store.writer_lock("m")
    weight = torch.zeros(D_MODEL, D_FFN)
    apply_edits(store, count, weight, shared_every)
    return store, weight


def test_loading_keeps_the_ledger_bitmaps_packed(tmp_path):
    store, weight = open_store(tmp_path, 10, shared_every=3)  # some edits share a mask
    state = store.load_state("m")
    assert isinstance(state.masks, PackedMasks)
    applied = store.applied("m")
    assert list(state.masks) == [e.id for e in applied]
    refs = store.applied_refs("m")  # what loading reads: five columns of the applied rows, in applied order
    assert [(r.id, r.delta_file, r.delta_sha256, r.mask_bits, r.applied_version) for r in refs] == \
        [(e.id, e.delta_file, e.delta_sha256, e.mask_bits, e.applied_version) for e in applied]
    width = (D_FFN + 7) // 8
    for n, edit in enumerate(applied):  # the index's words are the ledger's bytes, zero-padded
        raw = state.masks.words[n].numpy().tobytes()
        assert raw[:width] == edit.mask_bits and not any(raw[width:])
        assert state.masks[edit.id].tolist() == edit.mask
    assert torch.allclose(state.weight, weight, atol=1e-6)
    assert store.verify("m", live=state).ok


def test_verify_reads_each_delta_file_once(tmp_path, monkeypatch):
    store, _ = open_store(tmp_path, 8)  # the newest checkpoint holds all 8: nothing to add or subtract
    reads: Counter = Counter()
    get = store.blobs.get

    def counted(key):
        reads[key] += 1
        return get(key)

    monkeypatch.setattr(store.blobs, "get", counted)
    report = store.verify("m")
    assert report.ok, report.errors
    deltas = [e.delta_file for e in store.applied("m")]
    assert len(deltas) == 8 and all(reads[d] == 1 for d in deltas), reads


def test_verify_finds_a_checkpoint_index_mask_that_differs_from_its_delta(tmp_path):
    store, weight = open_store(tmp_path, 3)
    edit = store.applied("m")[1]
    other = [c for c in range(D_FFN) if c not in edit.mask][:K]
    Edit = store.t.Edit
    store.t.Edit.update(mask=encode_mask(other, D_FFN)).where(Edit.id == edit.id).execute()
    store.checkpoint("m", weight)  # its index takes the (wrong) ledger mask of edit 2
    store.t.Edit.update(mask=edit.mask_bits).where(Edit.id == edit.id).execute()
    report = store.verify("m")
    assert any(f"the masks of edits [{edit.id}] differ from their deltas'" in e for e in report.errors), report.errors


def test_verify_finds_a_live_index_that_differs(tmp_path):
    store, _ = open_store(tmp_path, 5, shared_every=2)
    state = store.load_state("m")
    assert store.verify("m", live=state).ok
    first, second = list(state.masks)[:2]
    state.masks[first] = state.masks[second]  # the live index holds edit 1 under edit 2's mask
    assert any("live index's masks" in e for e in store.verify("m", live=state).errors)
    del state.masks[first]
    assert any("live index holds edits" in e for e in store.verify("m", live=state).errors)


def test_restart_decides_as_before_and_warms_only_a_few_edits(tiny_llama, zsre, tmp_path):
    model, tokenizer = tiny_llama
    config = MemoirConfig(n_iter=3, check_size=1)
    runtime = Runtime.open(model, str(tmp_path / "store"), tokenizer=tokenizer, config=config, checkpoint_every=2)
    for n, record in enumerate(zsre[:5]):
        runtime.apply_request({"prompt": record["src"], "target": record["alt"], "request_id": f"z{n}"})
    prompts = [r["src"] for r in zsre[:5]] + [r["rephrase"] for r in zsre[:5]] + [r["loc"] for r in zsre[20:30]]
    memory = runtime.editor.memory

    def decisions(memory):
        batch = runtime.editor.batch(prompts)
        with torch.no_grad():
            runtime.editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return memory.last.rows.clone(), memory.last.ratios.clone(), memory.retrieved_edits()

    before = decisions(memory)
    assert (before[0][:5] >= 0).all()
    masks = {i: m.tolist() for i, m in runtime.state().masks.items()}
    runtime.close()

    runtime = Runtime.open(model, str(tmp_path / "store"), tokenizer=tokenizer)
    try:
        after = decisions(runtime.editor.memory)
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]) and after[2] == before[2]
        assert {i: m.tolist() for i, m in runtime.state().masks.items()} == masks
        live = list(runtime.store.applied_masks(runtime.name))
        cache = activations.activation_cache(runtime.editor)
        assert len(live) == 5 and activations.warm(runtime, limit=4) == 0 and not cache.group_of  # too many
        assert activations.warm(runtime, limit=5) == 5 and set(cache.group_of) == set(live)
        assert activations.warm(runtime, limit=None) == 0  # captured already
    finally:
        runtime.close()


def test_loading_builds_w_m_on_the_device_asked_for(tmp_path):
    """A worker rebuilds W_m (checkpoint + later deltas) on its own device, not on the CPU first:
    the "meta" device (shapes only) shows where the additions ran."""
    store, weight = open_store(tmp_path, 6)  # a checkpoint at 4, then 2 deltas to add
    assert store.load_state("m").weight.device.type == "cpu"
    assert store.weight_of("m", store.applied("m"), device="meta").device.type == "meta"
    state = store.load_state("m", device="meta")
    assert state.weight.device.type == "meta" and state.weight.shape == weight.shape
    assert torch.equal(store.load_state("m", device="cpu").weight, store.load_state("m").weight)
