"""Checkpoints that scale (issue 12, defect 7): a checkpoint row records its version, not the list
of the edits it holds (that list is in its own file), so the ledger work per edit does not grow
with the history; old checkpoints are pruned (`keep_checkpoints`, `memoir store compact`) without
losing any past memory (deltas are never deleted); checkpoints of the old form still load.

Hand-made states and deltas on real SQLite files (and PostgreSQL when one answers), as in
tests/test_store.py; `memoir store compact` as a real process beside a real lock holder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save as save_bytes

from store import FencingError, Store
from store.files import write_content_addressed
from store.records import utcnow
from store.snapshots import load_snapshot
from test_store import REPO, apply_edit, make_result, make_state, pg_url, store, store_target  # noqa: F401 (fixtures)


def raw_members(store: Store) -> list[str]:
    """The `members` column of every checkpoint row, as stored."""
    return [row[0] for row in store.db.execute_sql("SELECT members FROM checkpoint ORDER BY id").fetchall()]


def edits_with_checkpoints(store: Store, count: int, keep: int | None = None) -> tuple[torch.Tensor, dict]:
    """`count` edits, a checkpoint whenever one is due (pruned to `keep`); the live W_m after each seq."""
    weight = torch.zeros(8, 40)
    at_seq = {0: weight.clone()}
    for n in range(1, count + 1):
        apply_edit(store, weight, n)
        if store.checkpoint_due("default"):
            store.checkpoint("default", weight)
            if keep is not None:
                store.prune_checkpoints("default", keep)
        at_seq[n] = weight.clone()
    return weight, at_seq


def test_a_checkpoint_row_does_not_grow_with_the_history(store):
    weight, _ = edits_with_checkpoints(store, 30)  # a checkpoint every 3 edits: 10 of them
    rows = raw_members(store)
    assert len(rows) == 10
    assert max(len(r) for r in rows) == len(rows[0]) <= 2, rows[-1][:200]  # "{}": no list of edits
    newest = store.checkpoints("default")[-1]
    assert newest.version == 30 and set(store.checkpoint_members(newest)) == {e.id for e in store.applied("default")}
    assert torch.equal(store.load_state("default").weight, weight)
    # what loading reads from the newest checkpoint: its held edits come from the file, not the row
    gone = store.applied("default")[4]
    store.mark_rolled_back(gone, "outdated")
    make_result(gone.id, seed=5).delta.apply_to(weight, -1.0)
    torch.testing.assert_close(store.load_state("default").weight, weight, rtol=0, atol=1e-5)
    assert store.verify("default").ok


def test_checkpoint_due_reads_no_member_list(store):
    """Per edit, the ledger answers `checkpoint_due` without decoding any checkpoint's contents."""
    edits_with_checkpoints(store, 9)
    store.db.execute_sql("UPDATE checkpoint SET members = 'not json'")  # would break any decoding
    assert store.checkpoint_due("default") is False
    apply_edit(store, torch.zeros(8, 40), 10)
    apply_edit(store, torch.zeros(8, 40), 11)
    apply_edit(store, torch.zeros(8, 40), 12)
    assert store.checkpoint_due("default") is True


def test_pruning_keeps_the_newest_and_every_past_memory_still_loads(store):
    weight, at_seq = edits_with_checkpoints(store, 20, keep=2)
    kept = store.checkpoints("default")
    assert [c.version for c in kept] == [15, 18]
    files = sorted(p.name for p in (store.tensor_dir / "default" / "checkpoints").iterdir())
    assert files == sorted(store.path(c.file).name for c in kept)  # the pruned files are gone
    report = store.verify("default")
    assert report.ok and report.warnings == [], (report.errors, report.warnings)
    # a memory pinned before every kept checkpoint is rebuilt from the deltas (never deleted)
    for seq in (0, 4, 14, 16, 20):
        snapshot, state = load_snapshot(store, "default", seq)
        torch.testing.assert_close(state.weight, at_seq[seq], rtol=0, atol=1e-5)
    assert torch.equal(store.load_state("default").weight, weight)
    # pruning again keeps what it must; keep >= 1
    assert store.prune_checkpoints("default", 2) == []
    with pytest.raises(ValueError):
        store.prune_checkpoints("default", 0)


def test_a_checkpoint_file_pruned_under_a_reader_is_skipped(store):
    """A reader that planned on a checkpoint a compaction then removed falls back on an older one
    (or on zeros): the file is missing, the memory is the same."""
    weight, _ = edits_with_checkpoints(store, 9)
    newest = store.checkpoints("default")[-1]
    store.path(newest.file).unlink()
    torch.testing.assert_close(store.load_state("default").weight, weight, rtol=0, atol=1e-5)
    assert any("missing" in e for e in store.verify("default").errors)  # verify still says so


def test_a_checkpoint_of_the_old_form_still_loads(store):
    """Checkpoints written before this change list their edits in the ledger row and not in the
    file: they load, verify, and are pruned like the others."""
    weight = torch.zeros(8, 40)
    for n in range(1, 5):
        apply_edit(store, weight, n)
    applied = store.applied("default")
    memory = store.get_memory("default")
    masks = {e.id: e.mask for e in applied}
    ids = sorted(masks)
    data = save_bytes({"weight": weight.clone(), "mask_edit_ids": torch.tensor(ids, dtype=torch.int64),
                       "masks": torch.tensor([masks[i] for i in ids], dtype=torch.int32)},
                      metadata={"version": str(memory.version)})
    path, sha = write_content_addressed(store.tensor_dir, "default/checkpoints", data, prefix=f"v{memory.version:08d}-")
    store.t.Checkpoint.create(memory=memory.id, version=memory.version, file=path, sha256=sha, bytes=len(data),
                              members={str(e.id): e.delta_sha256 for e in applied}, created_at=utcnow())
    old = store.checkpoints("default")[-1]
    assert store.checkpoint_members(old) == {e.id: e.delta_sha256 for e in applied}
    store.mark_rolled_back(applied[1], "outdated")
    make_result(applied[1].id, seed=2).delta.apply_to(weight, -1.0)
    apply_edit(store, weight, 5)
    torch.testing.assert_close(store.load_state("default").weight, weight, rtol=0, atol=1e-5)
    assert store.verify("default").ok
    store.checkpoint("default", weight)
    assert [c.version for c in store.prune_checkpoints("default", 1)] == [old.version]
    assert not store.path(old.file).exists() and store.verify("default").ok


def test_a_checkpoint_keeps_masks_as_the_ledgers_bitmaps_and_files_with_columns_still_verify(store):
    """A checkpoint's index holds each mask as the ledger's D-bit bitmap (D/8 bytes; at 10 000 SmolLM2
    edits 1.9 MB instead of 17.6 MB of int32 columns). Files written before, with `masks` as k int32
    columns a row beside `member_sha256`, still load and verify, and verify still compares them."""
    from safetensors.torch import load as load_bytes

    from store.records import decode_mask

    weight = torch.zeros(8, 40)
    for n in range(1, 4):
        apply_edit(store, weight, n)
    record = store.checkpoint("default", weight)
    tensors = load_bytes(store.path(record.file).read_bytes())
    applied = sorted(store.applied("default"), key=lambda e: e.id)
    assert "masks" not in tensors and tensors["mask_bits"].shape == (3, 5)
    assert [bytes(row.tolist()) for row in tensors["mask_bits"]] == [e.mask_bits for e in applied]

    def rewrite_with_columns(masks: list[list[int]]) -> None:
        older = {key: value for key, value in tensors.items() if key != "mask_bits"}
        older["masks"] = torch.tensor(masks, dtype=torch.int32)
        data = save_bytes(older, metadata={"version": str(record.version)})
        path, sha = write_content_addressed(store.tensor_dir, "default/checkpoints", data, prefix="older-")
        store.t.Checkpoint.update(file=path, sha256=sha, bytes=len(data)).where(
            store.t.Checkpoint.id == record.id).execute()

    columns = [decode_mask(e.mask_bits) for e in applied]
    rewrite_with_columns(columns)
    torch.testing.assert_close(store.load_state("default").weight, weight, rtol=0, atol=0)
    assert store.verify("default").ok, store.verify("default").errors
    columns[1] = [c for c in range(40) if c not in columns[1]][: len(columns[1])]
    rewrite_with_columns(columns)
    assert any(f"the masks of edits [{applied[1].id}] differ" in e for e in store.verify("default").errors)


def test_a_writer_that_lost_its_lock_prunes_nothing(store_target):
    with Store.open(*store_target) as first, Store.open(*store_target) as second:
        first.create_memory("default", make_state(), "synthetic", checkpoint_every=1)
        lock = first.writer_lock("default")
        weight = torch.zeros(8, 40)
        for n in range(1, 4):
            apply_edit(first, weight, n)
            first.checkpoint("default", weight)
        lock.release()
        second.writer_lock("default")
        first._locks["default"] = lock
        with pytest.raises(FencingError):
            first.prune_checkpoints("default", 1)
        first._locks.pop("default")
        assert len(second.checkpoints("default")) == 3


def memoir(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_memoir_store_compact(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path) as store:
        store.create_memory("default", make_state(), "synthetic", checkpoint_every=2)
        edits_with_checkpoints(store, 10)
        assert len(store.checkpoints("default")) == 5
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from store import Store; "
                               "s = Store.open(sys.argv[1]); s.writer_lock('default'); print('locked', flush=True); "
                               "time.sleep(120)", path], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = memoir("store", "compact", "--store", path, "--keep-checkpoints", "1")
        assert refused.returncode != 0 and "writer lock" in refused.stderr, refused.stderr
    finally:
        holder.kill()
        holder.wait()
    with Store.open(path) as store:
        assert len(store.checkpoints("default")) == 5  # nothing pruned while a worker held the memory
    done = memoir("store", "compact", "--store", path, "--keep-checkpoints", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["default"]["removed"] == [2, 4, 6] and summary["default"]["kept"] == [8, 10]
    assert summary["default"]["bytes_freed"] > 0
    again = memoir("store", "compact", "--store", path, "--name", "default")
    assert again.returncode == 0 and "removed 0" in again.stdout, again.stdout
    verified = memoir("ledger", "verify", "--store", path, "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout.strip().splitlines()[-1])["warnings"] == []


@pytest.mark.slow
def test_memoir_apply_keeps_the_newest_checkpoints(tmp_path, trained_llama_path, zsre):
    from memoir import MemoirConfig
    from workers.runtime import Runtime

    path = str(tmp_path / "store")
    Runtime.open("builtin", path, config=MemoirConfig(n_iter=2, check_size=1), checkpoint_every=25).close()
    lines = tmp_path / "edits.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in zsre[:4]))
    done = memoir("apply", "--model", "builtin", "--store", path, "--file", str(lines), "--keep-checkpoints", "2",
                  "--checkpoint-every", "1", "--json")  # the recorded interval changes with the option
    assert done.returncode in (0, 1), done.stderr  # 1: an edit the tiny model refused; the others are in
    with Store.open(path) as store:
        version = store.get_memory("default").version
        assert store.get_memory("default").checkpoint_every == 1
        assert version >= 2 and [c.version for c in store.checkpoints("default")] == [version - 1, version]
        assert store.verify("default").ok
