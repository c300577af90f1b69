"""The runtime: real edits on a tiny random-weight Llama, recorded in a real SQLite store."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch

from memoir import MemoirConfig, MemoryMismatchError
from store import APPLIED, FAILED, Store, WriterLockedError
from workers.runtime import Policy, Runtime, default_background_prompts

FAST = MemoirConfig(n_iter=5, check_size=1)


def request(record: dict, request_id: str | None = None) -> dict:
    out = {"prompt": record["src"], "target": record["alt"], "rephrases": [record["rephrase"]],
           "metadata": {"subject": record["subject"]}}
    if request_id is not None:
        out["request_id"] = request_id
    return out


def open_runtime(pair, path, **kwargs) -> Runtime:
    model, tokenizer = pair
    return Runtime.open(model, str(path), tokenizer=tokenizer, config=FAST, **kwargs)


def snapshot(runtime: Runtime) -> tuple[torch.Tensor, dict[int, list[int]]]:
    state = runtime.state()
    return state.weight.clone(), {i: m.tolist() for i, m in state.masks.items()}


@pytest.mark.slow
def test_fifty_edits_keep_the_invariants(tiny_llama, tiny_model_factory, zsre, tmp_path):
    runtime = open_runtime(tiny_llama, tmp_path / "store", checkpoint_every=16)
    store = runtime.store
    outcomes = [runtime.apply_request(request(r, f"z-{n}")) for n, r in enumerate(zsre[:50])]
    assert [o["status"] for o in outcomes] == [APPLIED] * 50
    assert [o["seq"] for o in outcomes] == list(range(1, 51))
    assert all(o["loss"] is not None and o["steps"] >= 1 and set(o["scores"]) >= {"rel", "gen", "loc"}
               for o in outcomes)

    # W_m = Σ deltas of the applied edits (the same additions in the same order: bitwise)
    applied = store.applied("default")
    total = torch.zeros_like(runtime.editor.memory.weight)
    for edit in applied:
        store.load_delta(edit).apply_to(total)
    live = runtime.state()
    assert torch.equal(live.weight, total)
    # the index holds exactly their masks, each distinct mask with the count of edits using it
    ledger_masks = {e.id: tuple(e.mask) for e in applied}
    assert {i: tuple(m.tolist()) for i, m in live.masks.items()} == ledger_masks
    assert runtime.editor.memory.index.usage() == dict(Counter(ledger_masks.values()))
    # loading = newest checkpoint + later deltas gives the same memory, bitwise
    assert [c.version for c in store.checkpoints("default")] == [16, 32, 48]
    loaded = store.load_state("default")
    assert torch.equal(loaded.weight, live.weight) and loaded.masks.keys() == live.masks.keys()
    report = runtime.verify()
    assert report.ok and report.warnings == [], report
    # verify rebuilds W_m with numpy (the ledger commands never import torch): its G·Aᵀ products come
    # from another BLAS kernel than torch's, equal up to float rounding (the torch sum above is bitwise)
    assert report.checked["applied"] == 50 and report.checked["live_max_abs_diff"] < 1e-6

    # reopened on a fresh load of the model: the same memory and the same answers
    prompts = [r["src"] for r in zsre[:6]] + [r["loc"] for r in zsre[:2]]
    before = runtime.generate(prompts, max_new_tokens=6)
    runtime.close()
    with open_runtime(tiny_model_factory("llama"), tmp_path / "store") as again:
        assert torch.equal(again.state().weight, live.weight)
        assert again.generate(prompts, max_new_tokens=6) == before


def test_failed_edits_change_nothing(tiny_llama, zsre, tmp_path):
    runtime = open_runtime(tiny_llama, tmp_path / "store")
    for n, record in enumerate(zsre[:3]):
        assert runtime.apply_request(request(record, f"ok-{n}"))["status"] == APPLIED
    weight, masks = snapshot(runtime)
    versions = runtime.store.get_memory("default").version

    def unchanged() -> None:
        now_weight, now_masks = snapshot(runtime)
        assert torch.equal(now_weight, weight) and now_masks == masks
        assert runtime.store.get_memory("default").version == versions
        assert runtime.verify().ok

    # an invalid edit: recorded, failed with the reason
    bad = runtime.apply_request({"prompt": "Who?", "target": "   ", "request_id": "blank"})
    assert bad["status"] == FAILED and "target" in bad["reason"] and bad["edit_id"] is not None
    unchanged()
    # unrecordable payloads and id conflicts: refused, nothing recorded
    assert runtime.apply_request({"prompt": 5, "target": "x"})["edit_id"] is None
    conflict = runtime.apply_request({**request(zsre[0]), "target": "something else", "request_id": "ok-0"})
    assert conflict["status"] == FAILED and "different payload" in conflict["reason"]
    assert runtime.apply_request({**request(zsre[5]), "name": "other"})["status"] == FAILED
    unchanged()
    # the acceptance policy refuses an edit below its floor: reverted, failed with its scores
    runtime.configure(policy={"min_scores": {"rel": 1.01}})
    refused = runtime.apply_request(request(zsre[3], "floor"))
    assert refused["status"] == FAILED and "acceptance policy" in refused["reason"]
    assert set(refused["scores"]) >= {"rel", "loc"} and runtime.store.edit(refused["edit_id"]).scores
    unchanged()
    runtime.configure(policy={})
    # a disk error while writing the delta: reverted, failed with the reason
    deltas = runtime.store.tensor_dir / "default" / "deltas"
    shutil.move(deltas, deltas.with_name("moved"))
    deltas.write_text("not a directory")
    try:
        broken = runtime.apply_request(request(zsre[4], "disk"))
    finally:
        deltas.unlink()
        shutil.move(deltas.with_name("moved"), deltas)
    assert broken["status"] == FAILED and "Error" in broken["reason"]
    unchanged()
    statuses = Counter(e.status for e in runtime.store.edits("default"))
    assert statuses == {APPLIED: 3, FAILED: 3}
    runtime.close()


def test_request_ids_are_applied_once(tiny_llama, zsre, tmp_path):
    with open_runtime(tiny_llama, tmp_path / "store") as runtime:
        first = runtime.apply_request(request(zsre[0], "once"))
        weight, masks = snapshot(runtime)
        again = runtime.apply_request(request(zsre[0], "once"))
        assert first["status"] == APPLIED and again["duplicate"] and not first["duplicate"]
        assert {k: v for k, v in again.items() if k != "duplicate"} == {k: v for k, v in first.items()
                                                                        if k != "duplicate"}
        assert torch.equal(snapshot(runtime)[0], weight) and snapshot(runtime)[1] == masks
        assert len(runtime.store.edits("default")) == 1


def test_resume_redoes_pending_rows(tiny_llama, zsre, tmp_path):
    path = tmp_path / "store"
    with open_runtime(tiny_llama, path) as runtime:
        runtime.apply_request(request(zsre[0], "done"))
        store = runtime.store
        queued, _ = store.record_request("default", "left-queued", zsre[1]["src"], zsre[1]["alt"])
        applying, _ = store.record_request("default", "left-applying", zsre[2]["src"], zsre[2]["alt"])
        store.mark_applying(applying)
        outcomes = runtime.resume()
        assert [(o["request_id"], o["status"]) for o in outcomes] == [("left-queued", APPLIED),
                                                                       ("left-applying", APPLIED)]
        assert store.pending("default") == [] and runtime.verify().ok


def test_one_writer_per_memory(tiny_llama, tiny_model_factory, zsre, tmp_path):
    path = tmp_path / "store"
    with open_runtime(tiny_llama, path) as writer:
        writer.apply_request(request(zsre[0], "a"))
        with pytest.raises(WriterLockedError, match="pid"):
            open_runtime(tiny_model_factory("llama"), path)
        with open_runtime(tiny_model_factory("llama"), path, readonly=True) as reader:
            assert reader.state().masks.keys() == writer.state().masks.keys()
            with pytest.raises(RuntimeError, match="read-only"):
                reader.apply_request(request(zsre[1]))
    with open_runtime(tiny_model_factory("llama"), path) as next_writer:  # the lock went with the first
        assert next_writer.apply_request(request(zsre[1], "b"))["status"] == APPLIED


def test_a_memory_refuses_another_model_or_layer(tiny_llama, tiny_model_factory, tmp_path):
    path = tmp_path / "store"
    open_runtime(tiny_llama, path).close()
    with pytest.raises(MemoryMismatchError, match="hidden_size"):
        open_runtime(tiny_model_factory("llama", hidden=32), path)
    with pytest.raises(MemoryMismatchError, match="layer"):
        open_runtime(tiny_model_factory("llama"), path, layer=1)
    with Store.open(path) as store:  # the refusals left the store as it was, and unlocked
        assert len(store.memories()) == 1 and store.edits() == []
        store.writer_lock("default").release()


def test_policy_round_trip():
    policy = Policy.from_dict({"min_scores": {"rel": 0.5, "gen": 0.25}})
    assert Policy.from_dict(policy.to_dict()) == policy
    assert policy.shortfalls({"rel": 0.5, "gen": 0.3}) == []
    assert policy.shortfalls({"rel": 0.4}) == ["gen nan < 0.250", "rel 0.400 < 0.500"]
    assert len(default_background_prompts()) == 50

