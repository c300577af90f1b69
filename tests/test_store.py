"""The edit store on real SQLite files (and a real PostgreSQL server when one answers).

These tests use hand-made memory states and deltas (no model): they are about the ledger,
the files and the invariants; tests/test_runtime.py drives the store with real edits.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from memoir import EditDelta, EditResult, MemoirConfig, MemoryMismatchError, MemoryState, ModelIdentity
from store import (
    APPLIED,
    APPLYING,
    FAILED,
    QUEUED,
    ROLLED_BACK,
    FencingError,
    InvalidRequestError,
    MemoryExistsError,
    RequestConflictError,
    StatusError,
    Store,
    UnknownEditError,
    UnknownMemoryError,
    WriterLockedError,
)
from store.records import decode_mask, encode_mask

D_MODEL, D_FFN, K = 8, 40, 12
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REPO = Path(__file__).resolve().parent.parent


def make_state(seed: int = 0, hidden: int = D_MODEL) -> MemoryState:
    gen = torch.Generator().manual_seed(seed)
    config = MemoirConfig(layer=1, top_k=K, n_iter=5)
    identity = ModelIdentity("synthetic", "llama", "model.layers.1.mlp.down_proj", hidden, D_FFN, 2, 100)
    return MemoryState(config, identity, torch.randperm(D_FFN, generator=gen), torch.randn(D_FFN, generator=gen),
                       ["I am", "You"], ["unrelated one", "unrelated two"], True, torch.zeros(hidden, D_FFN))


def make_result(edit_id: int, seed: int, dense: bool = False) -> EditResult:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.randperm(D_FFN, generator=gen)[:K].sort().values
    g, a = torch.randn(D_MODEL, 3, generator=gen), torch.randn(K, 3, generator=gen)
    delta = EditDelta(mask=mask, dense_=g @ a.T) if dense else EditDelta(mask=mask, g=g, a=a)
    return EditResult(edit_id, "p", "t", delta, [2.0, 0.5], 1, 0.01, "unrelated one", {"rel": 1.0, "loc": 1.0})


def pg_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(PG_URL, connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return False


@pytest.fixture
def pg_url():
    """A fresh schema on the PostgreSQL server (dropped afterwards); skips when none answers."""
    if not pg_available():
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    import psycopg2

    schema = f"memoir_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_target(request, tmp_path):
    """(path or URL, tensor dir) of an empty store on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("pg_url"), str(tmp_path / "tensors")


@pytest.fixture
def store(store_target):
    s = Store.open(*store_target)
    s.create_memory("default", make_state(), "synthetic", "rev1", checkpoint_every=3)
    yield s
    s.close()


def apply_edit(store: Store, weight: torch.Tensor, n: int, dense: bool = False, name: str = "default"):
    edit, created = store.record_request(name, f"req-{name}-{n}", f"prompt {n}", f"target {n}", [f"rephrase {n}"],
                                         {"subject": f"s{n}"})
    assert created
    store.mark_applying(edit)
    result = make_result(edit.id, seed=n, dense=dense)
    result.delta.apply_to(weight)
    return store.mark_applied(edit, result), result


# ------------------------------------------------------------------------------ round trips


def test_memory_round_trip(store):
    record = store.get_memory("default")
    state = make_state()
    assert (record.model_id, record.revision, record.layer, record.top_k) == ("synthetic", "rev1", 1, K)
    assert (record.hidden_size, record.intermediate_size, record.seed) == (D_MODEL, D_FFN, 0)
    assert record.metadata == state.metadata()
    loaded = store.load_state("default")
    assert torch.equal(loaded.permutation, state.permutation)
    assert torch.equal(loaded.background, state.background)
    assert loaded.context_prefixes == state.context_prefixes and loaded.prepend_bos is True
    assert loaded.config == state.config and loaded.masks == {}
    assert torch.equal(loaded.weight, torch.zeros(D_MODEL, D_FFN))
    with pytest.raises(MemoryExistsError):
        store.create_memory("default", make_state(), "synthetic")
    with pytest.raises(UnknownMemoryError):
        store.get_memory("nope")


def test_edit_round_trip(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    factored, result = apply_edit(store, weight, 1)
    dense, dense_result = apply_edit(store, weight, 2, dense=True)
    again = store.edit(factored.id)
    assert again.status == APPLIED and again.seq == 1 and dense.seq == 2
    assert (again.prompt, again.target, again.rephrases, again.metadata) == ("prompt 1", "target 1", ["rephrase 1"],
                                                                            {"subject": "s1"})
    assert again.mask == result.delta.mask.tolist() and again.mask_size == K
    assert (again.loss, again.losses, again.steps, again.unrelated) == (0.5, [2.0, 0.5], 1, "unrelated one")
    assert again.scores == {"rel": 1.0, "loc": 1.0}
    assert again.delta_format == "factored" and dense.delta_format == "dense"
    assert again.created_at <= again.applied_at
    loaded = store.load_delta(again)
    assert torch.equal(loaded.mask, result.delta.mask) and torch.equal(loaded.dense(), result.delta.dense())
    assert torch.equal(store.load_delta(dense.id).dense(), dense_result.delta.dense())
    state = store.load_state("default")
    assert torch.equal(state.weight, weight)
    assert {i: m.tolist() for i, m in state.masks.items()} == {factored.id: again.mask, dense.id: dense.mask}
    kinds = [e.kind for e in store.events(factored)]
    assert kinds == [QUEUED, APPLYING, APPLIED]
    assert store.events(factored)[-1].detail["delta_sha256"] == again.delta_sha256


def test_mask_codec_round_trip():
    columns = [0, 7, 8, 13, 39]
    bits = encode_mask(columns, 40)
    assert len(bits) == 5 and decode_mask(bits) == columns
    with pytest.raises(ValueError):
        encode_mask([40], 40)


# ------------------------------------------------------------------------- request ids


def test_request_id_is_unique_and_idempotent(store):
    first, created = store.record_request("default", "r-1", "p", "t", ["q"], {"a": 1})
    same, created_again = store.record_request("default", "r-1", "p", "t", ["q"], {"a": 1})
    assert created and not created_again and same.id == first.id and same.seq == first.seq
    for change in ({"prompt": "p2"}, {"target": "t2"}, {"rephrases": []}, {"metadata": {"a": 2}}):
        args = {"prompt": "p", "target": "t", "rephrases": ["q"], "metadata": {"a": 1}, **change}
        with pytest.raises(RequestConflictError, match="r-1"):
            store.record_request("default", "r-1", **args)
    assert len(store.edits("default")) == 1


@pytest.mark.parametrize("bad", [
    {"request_id": ""}, {"request_id": "x" * 300}, {"prompt": 3}, {"target": None}, {"rephrases": "one"},
    {"rephrases": [1]}, {"metadata": ["x"]}, {"metadata": {"k": object()}}, {"prompt": "bad \udcff utf-8"},
    {"target": "nul\x00"}, {"replaces": []}, {"replaces": "3"}, {"replaces": True}, {"replaces": 0},
    {"supersedes": [[]]},
])
def test_unrecordable_requests_are_refused(store, bad):
    args = {"request_id": "ok", "prompt": "p", "target": "t", "rephrases": [], "metadata": {}, **bad}
    with pytest.raises(InvalidRequestError):
        store.record_request("default", **args)
    assert store.edits("default") == []


def test_sequence_numbers_per_memory(store):
    store.create_memory("other", make_state(1), "synthetic")
    seqs = [store.record_request(name, f"{name}-{n}", "p", "t")[0].seq for n in range(3) for name in ("default", "other")]
    assert seqs == [1, 1, 2, 2, 3, 3]
    assert [e.seq for e in store.edits("other")] == [1, 2, 3]
    assert [e.seq for e in store.pending("default")] == [1, 2, 3]


# ------------------------------------------------------------------------------ statuses


def test_status_transitions(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    queued, _ = store.record_request("default", "q", "p", "t")
    with pytest.raises(StatusError):
        store.mark_applied(queued, make_result(queued.id, 0))  # must be applying first
    with pytest.raises(StatusError):
        store.mark_rolled_back(queued, "no", "me")
    failed = store.mark_failed(queued, "it broke", scores={"rel": 0.1})
    assert (failed.status, failed.reason, failed.scores) == (FAILED, "it broke", {"rel": 0.1})
    with pytest.raises(StatusError):
        store.mark_applying(failed)
    applied, _ = apply_edit(store, weight, 1)
    with pytest.raises(StatusError):
        store.mark_failed(applied, "late")
    rolled = store.mark_rolled_back(applied, "outdated", actor="alice")
    assert rolled.status == ROLLED_BACK and rolled.reason == "outdated" and rolled.rolled_back_at is not None
    assert store.events(rolled)[-1].actor == "alice"
    with pytest.raises(StatusError):
        store.mark_rolled_back(rolled, "twice", "alice")
    with pytest.raises(UnknownEditError):
        store.mark_rolled_back(999, "unknown", "alice")
    assert store.load_state("default").masks == {}
    assert [e.status for e in store.edits("default", status=[FAILED, ROLLED_BACK])] == [FAILED, ROLLED_BACK]
    assert [e.id for e in store.edits("default", limit=1)] == [rolled.id]


def test_failed_edits_change_nothing(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    apply_edit(store, weight, 1)
    before = store.load_state("default")
    edit, _ = store.record_request("default", "bad", "p", "t")
    store.mark_applying(edit)
    store.mark_failed(edit, "refused")
    after = store.load_state("default")
    assert torch.equal(before.weight, after.weight) and after.masks.keys() == before.masks.keys()
    assert store.verify("default").ok


# ------------------------------------------------- W_m = Σ deltas, checkpoints, verify


def test_weight_is_sum_of_applied_deltas_across_checkpoints_and_rollbacks(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    edits = [apply_edit(store, weight, n, dense=n % 4 == 0) for n in range(10)]
    for edit, result in edits:
        if store.checkpoint_due("default"):
            store.checkpoint("default", weight)
    # without rollbacks, the reload is bitwise the live memory: the same additions in the same order
    state = store.load_state("default")
    assert torch.equal(state.weight, weight)
    assert len(store.checkpoints("default")) >= 1
    # roll back an edit held by the newest checkpoint, and replay another with a new delta
    gone, gone_result = edits[1]
    gone_result.delta.apply_to(weight, -1.0)
    store.mark_rolled_back(gone, "outdated", "test")
    replayed, old_result = edits[2]
    new_result = make_result(replayed.id, seed=100)
    old_result.delta.apply_to(weight, -1.0)
    new_result.delta.apply_to(weight, 1.0)
    store.mark_replayed(replayed, new_result)
    state = store.load_state("default")
    assert torch.allclose(state.weight, weight, atol=1e-5)
    assert gone.id not in state.masks and state.masks[replayed.id].tolist() == new_result.delta.mask.tolist()
    report = store.verify("default", live=state)
    assert report.ok, report.errors
    assert report.checked["applied"] == 9 and report.warnings == []
    # the live check catches a W_m that is not the sum
    state.weight[0, 0] += 1.0
    assert any("live W_m" in e for e in store.verify("default", live=state).errors)


def test_verify_finds_a_corrupted_delta_file(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    edit, _ = apply_edit(store, weight, 1)
    apply_edit(store, weight, 2)
    assert store.verify().ok
    path = store.path(edit.delta_file)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    report = store.verify()
    assert not report.ok and any(f"edit {edit.id}" in e and "corrupt" in e for e in report.errors)
    with pytest.raises(Exception, match="sha256"):
        store.load_state("default")


def test_verify_finds_a_checkpoint_that_is_not_the_sum(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    for n in range(3):
        apply_edit(store, weight, n)
    wrong = weight.clone()
    wrong[1, 2] += 0.5
    store.checkpoint("default", wrong)
    report = store.verify("default")
    assert any("differs from the sum" in e for e in report.errors)


def test_verify_finds_a_ledger_mask_that_differs_from_its_delta(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    edit, _ = apply_edit(store, weight, 1)
    other = [c for c in range(D_FFN) if c not in edit.mask][:K]
    store.t.Edit.update(mask=encode_mask(other, D_FFN)).where(store.t.Edit.id == edit.id).execute()
    assert any("mask differs" in e for e in store.verify("default").errors)


def test_verify_finds_statuses_that_break_the_rules(store):
    weight = torch.zeros(D_MODEL, D_FFN)
    edit, _ = apply_edit(store, weight, 1)
    store.t.Edit.update(delta_file=None).where(store.t.Edit.id == edit.id).execute()
    failed, _ = store.record_request("default", "f", "p", "t")
    store.t.Edit.update(status=FAILED, reason=None).where(store.t.Edit.id == failed.id).execute()
    errors = store.verify("default").errors
    assert any("has no delta_file" in e for e in errors) and any("failed without a reason" in e for e in errors)


def test_verify_reads_deltas_in_threads_and_reports_as_one_thread_does(store, monkeypatch):
    """Delta files are read, hashed and multiplied out in threads: every fault is still found, once,
    in ledger order, and the report equals the one-thread report."""
    from safetensors.torch import save as save_tensors

    weight = torch.zeros(D_MODEL, D_FFN)
    edits = [apply_edit(store, weight, n)[0] for n in range(40)]
    assert store.verify("default").ok
    store.path(edits[3].delta_file).unlink()  # missing
    corrupt = store.path(edits[11].delta_file)
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0x01
    corrupt.write_bytes(bytes(data))  # corrupt
    other = [c for c in range(D_FFN) if c not in edits[20].mask][:K]
    store.t.Edit.update(mask=encode_mask(other, D_FFN)).where(store.t.Edit.id == edits[20].id).execute()
    wrong = save_tensors({"mask": torch.tensor(edits[29].mask), "g": torch.zeros(D_MODEL + 1, 3),
                          "a": torch.zeros(K, 3)})  # valid file, hash in the ledger, wrong shapes
    store.path(edits[29].delta_file).write_bytes(wrong)
    store.t.Edit.update(delta_sha256=hashlib.sha256(wrong).hexdigest()).where(
        store.t.Edit.id == edits[29].id).execute()
    monkeypatch.setattr("store.parallel.THREADS", 4)
    threaded = store.verify("default")
    monkeypatch.setattr("store.parallel.THREADS", 1)
    alone = store.verify("default")
    assert threaded.errors == alone.errors and threaded.checked == alone.checked
    per_edit = [e for e in threaded.errors if "(seq " in e]
    assert [next(i for i, x in enumerate(edits) if f"edit {x.id} (seq" in e) for e in per_edit] == [3, 11, 20, 29]
    assert "missing" in per_edit[0] and "corrupt" in per_edit[1] and "mask differs" in per_edit[2]
    assert "shapes" in per_edit[3]
    assert threaded.checked["delta_files"] == 40


def test_load_refuses_another_model(store):
    other = make_state(hidden=D_MODEL * 2).model
    with pytest.raises(MemoryMismatchError, match="hidden_size"):
        store.load_state("default", expect=other)
    assert store.load_state("default", expect=make_state().model).config.top_k == K


# ------------------------------------------------------------------- crash, permissions, lock


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from store import Store
    from test_store import make_result
    store = Store.open({path!r})
    edit, _ = store.record_request("default", "crash-1", "prompt", "target")
    store.mark_applying(edit)
    store._write_delta("default", store._edit_row(edit.id), make_result(edit.id, seed=7).delta)
    os._exit(9)  # killed between the delta file and the ledger commit
""")


def test_crash_between_delta_write_and_ledger_commit(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path) as store:
        store.create_memory("default", make_state(), "synthetic")
        weight = torch.zeros(D_MODEL, D_FFN)
        apply_edit(store, weight, 1)
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT.format(tests=str(REPO / "tests"), path=path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr
    with Store.open(path) as store:
        state = store.load_state("default")  # loadable, the crashed edit not in it
        assert torch.equal(state.weight, weight) and len(state.masks) == 1
        [pending] = store.pending("default")
        assert pending.request_id == "crash-1" and pending.status == APPLYING
        report = store.verify("default")
        assert report.ok and any("orphan file" in w for w in report.warnings)
        assert any("resume" in w for w in report.warnings)
        # redoing the edit writes the same bytes: the orphan becomes its delta
        result = make_result(pending.id, seed=7)
        store.mark_applying(pending)
        store.mark_applied(pending, result)
        result.delta.apply_to(weight)
        report = store.verify("default")
        assert report.ok and report.warnings == []
        assert torch.equal(store.load_state("default").weight, weight)


def test_store_files_are_owner_only(tmp_path):
    root = tmp_path / "store"
    old = os.umask(0o022)
    try:
        with Store.open(root) as store:
            store.create_memory("default", make_state(), "synthetic")
            weight = torch.zeros(D_MODEL, D_FFN)
            apply_edit(store, weight, 1)
            store.checkpoint("default", weight)
            store.writer_lock("default")
            assert (root / "ledger.db-wal").exists()  # the WAL and its index, while open
            paths = [root, *root.rglob("*")]
    finally:
        os.umask(old)
    assert {p.name for p in paths} >= {"ledger.db", "ledger.db-wal", "ledger.db-shm", "default.lock", "deltas",
                                       "checkpoints"}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
        expected = 0o700 if path.is_dir() else 0o600
        assert mode in (expected, None), f"{path.relative_to(tmp_path)} is {oct(mode)}"


def test_tensor_directory_apart_from_the_ledger(tmp_path):
    with Store.open(tmp_path / "ledger", tensor_dir=tmp_path / "volume") as store:
        store.create_memory("default", make_state(), "synthetic")
        weight = torch.zeros(D_MODEL, D_FFN)
        edit, _ = apply_edit(store, weight, 1)
    assert (tmp_path / "volume" / edit.delta_file).is_file()
    assert not (tmp_path / "ledger" / "tensors").exists()
    with Store.open(tmp_path / "ledger", tensor_dir=tmp_path / "volume") as store:
        assert torch.equal(store.load_state("default").weight, weight)


def test_writer_lock_is_exclusive_and_fenced(store_target):
    with Store.open(*store_target) as first, Store.open(*store_target) as second:
        first.create_memory("default", make_state(), "synthetic")
        lock = first.writer_lock("default")
        with pytest.raises(WriterLockedError, match=f"pid {os.getpid()}"):
            second.writer_lock("default")
        with pytest.raises(WriterLockedError):
            second.writer_lock("default", wait=0.5)
        edit, _ = first.record_request("default", "a", "p", "t")  # fenced commit passes
        lock.release()
        taken = second.writer_lock("default")
        # a writer whose lock was taken over is stopped before its next commit
        first._locks["default"] = lock
        with pytest.raises(FencingError):
            first.record_request("default", "b", "p", "t")
        with pytest.raises(FencingError):
            lock.check()
        first._locks.pop("default")
        second.record_request("default", "c", "p", "t")
        taken.check()
        taken.release()
        assert [e.request_id for e in second.edits("default")] == ["a", "c"]


def test_file_lock_names_a_holder_in_another_process(tmp_path):
    path = str(tmp_path / "store")
    Store.open(path).close()
    script = ("import sys, time; from store import Store; s = Store.open(sys.argv[1]); "
              "s.writer_lock('default'); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, path], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Store.open(path) as store, pytest.raises(WriterLockedError, match=f"pid {holder.pid}"):
            store.writer_lock("default")
    finally:
        holder.kill()
        holder.wait()
    with Store.open(path) as store:  # the holder died: its lock went with it
        store.writer_lock("default").release()


def test_database_url_needs_a_tensor_directory(monkeypatch):
    monkeypatch.delenv("MEMOIR_TENSORS", raising=False)
    with pytest.raises(Exception, match="tensor directory"):
        Store.open("postgresql://postgres@127.0.0.1:5432/test")


def test_store_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_STORE", str(tmp_path / "env-store"))
    with Store.open() as store:
        assert store.location == str(tmp_path / "env-store")
    assert (tmp_path / "env-store" / "ledger.db").is_file()


def test_event_log_is_append_only(store):
    edit, _ = store.record_request("default", "r", "p", "t")
    Event = store.t.Event
    with pytest.raises(Exception, match="append-only"):
        Event.update(kind="applied").where(Event.edit == edit.id).execute()
    with pytest.raises(Exception, match="append-only"):
        Event.delete().where(Event.edit == edit.id).execute()
    assert [e.kind for e in store.events(edit)] == [QUEUED]
