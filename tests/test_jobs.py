"""Jobs finish (issue 12, defects 8 and 9): superseding and rollback jobs are recorded in the
ledger and the next worker finishes, at start, what a crash or an unwritable store left undone;
a writer that lost its lock writes nothing, events included.

On the built-in trained tiny Llama and real SQLite stores: the `six` store of
tests/test_rollback_cli.py and the `thirty` store of tests/test_rollback.py. "The next worker"
is a new Runtime on the same store calling `resume()`, which is what `memoir worker` and
`memoir apply` run before anything else. The store fault is real: the tensor directory on a
tmpfs of its own, filled (ENOSPC); without root, a deltas directory that is not writable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from memoir.tinymodel import load_pretrained_pair
from pipeline.schema import SAME_PROMPT
from store import APPLIED, ROLLED_BACK, FencingError, Store
from store.jobs import DONE, FAILED, PENDING, RUNNING
from test_rollback import breaking_edit, sum_of_deltas, thirty  # noqa: F401 (thirty is a fixture)
from test_rollback_cli import six  # noqa: F401 (a fixture)
from test_store import make_state, pg_url, store_target  # noqa: F401 (fixtures)
from workers import rollback as rb
from workers import supersede as sup
from workers.runtime import Runtime

pytestmark = pytest.mark.slow


def next_worker(path: Path, trained_llama_path: Path, **kwargs) -> Runtime:
    model, tokenizer = load_pretrained_pair(trained_llama_path)
    return Runtime.open(model, path, tokenizer=tokenizer, **kwargs)


def consistent(runtime: Runtime) -> None:
    assert runtime.verify().ok, runtime.verify().errors
    torch.testing.assert_close(runtime.editor.memory.weight, sum_of_deltas(runtime), rtol=0, atol=1e-5)


# -- defect 8: a superseding edit resumed at start rolls back the edit it replaces -----------------


def test_a_superseding_edit_resumed_at_start_rolls_back_the_edit_it_replaces(six, trained_llama_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(six, path)
    with Store.open(path) as store:  # what a worker that died right after recording the request leaves
        prompt = store.edit(2).prompt
        store.record_request("default", "fix-2", prompt, "Someone Else", replaces=2)
    with next_worker(path, trained_llama_path) as runtime:
        outcomes = runtime.resume()
        store = runtime.store
        new = store.edit_by_request("fix-2")
        assert [(o["request_id"], o["status"]) for o in outcomes] == [("fix-2", APPLIED)]
        assert new.status == APPLIED and store.edit(2).status == ROLLED_BACK
        assert store.edit(2).reason == f"superseded by edit {new.id}"
        job = sup.supersede_job(new, store.edit(2))
        assert [e.detail for e in store.events(new, kinds=[sup.SUPERSEDES])] == [{"replaced": 2, "job": job}]
        assert store.job(job).status == DONE and store.jobs("default", status=[PENDING, RUNNING]) == []
        assert 2 not in runtime.state().masks and new.id in runtime.state().masks
        consistent(runtime)
        # the message redelivered afterwards finds everything done
        again = sup.apply_superseding(runtime, {"prompt": prompt, "target": "Someone Else", "request_id": "fix-2",
                                               "replaces": 2})
        assert again["duplicate"] and again["superseded"] == []


def test_every_edit_a_same_prompt_request_replaces_is_rolled_back_on_resume(six, trained_llama_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(six, path)
    with next_worker(path, trained_llama_path) as runtime:
        store = runtime.store
        prompt = store.edit(3).prompt
        twin = runtime.apply_request({"prompt": prompt, "target": "Twin", "request_id": "twin"})["edit_id"]
        named = sup.replaced_edits(store, "default", {"prompt": prompt, "replaces": SAME_PROMPT})
        assert [e.id for e in named] == [3, twin]
        # recorded with the edits it replaces, then the worker died after applying it
        applied = runtime.apply_request({"prompt": prompt, "target": "Third", "request_id": "third",
                                         "replaces": named[0].id}, supersedes=[e.id for e in named])
        assert applied["status"] == APPLIED and store.edit(3).status == store.edit(twin).status == APPLIED
    with next_worker(path, trained_llama_path) as runtime:
        assert runtime.resume() == []  # no pending edit; the jobs are resumed
        store = runtime.store
        assert store.edit(3).status == store.edit(twin).status == ROLLED_BACK
        assert store.edit(applied["edit_id"]).status == APPLIED
        consistent(runtime)


def test_a_superseding_edit_that_fails_cancels_its_rollbacks(six, trained_llama_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(six, path)
    with next_worker(path, trained_llama_path) as runtime:
        store = runtime.store
        outcome = sup.apply_superseding(runtime, {"prompt": store.edit(2).prompt, "target": "   ",
                                                  "request_id": "blank", "replaces": 2})
        assert outcome["status"] == "failed" and outcome["superseded"] == []
        job = store.job(sup.supersede_job(store.edit(outcome["edit_id"]), store.edit(2)))
        assert job.status == FAILED and "failed" in job.error
        assert store.edit(2).status == APPLIED
        assert runtime.resume() == [] and store.edit(2).status == APPLIED


# -- defect 9: a rollback job is never abandoned half-done; events are fenced -----------------------


def test_a_writer_that_lost_its_lock_writes_no_event(store_target):
    with Store.open(*store_target) as first, Store.open(*store_target) as second:
        first.create_memory("default", make_state(), "synthetic")
        lock = first.writer_lock("default")
        first.log_event("default", "note", detail={"by": "first"})  # fenced, and still ours
        lock.release()
        second.writer_lock("default")
        first._locks["default"] = lock  # as if it still believed it held the lock
        with pytest.raises(FencingError):
            first.log_event("default", "note", detail={"by": "stale"})
        first._locks.pop("default")
        assert [e.detail["by"] for e in second.events(name="default", kinds=["note"])] == ["first"]


def mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    import subprocess

    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def on_tmpfs(thirty, tmp_path):
    """(store, tensor dir, inject, clear): a copy of the 30-edit store whose tensors live on a
    tmpfs of their own; `inject` fills it (ENOSPC), `clear` frees it."""
    import subprocess

    store, tensors = tmp_path / "store", tmp_path / "tensors"
    shutil.copytree(thirty, store)
    mounted = mount_tmpfs(tensors)
    if not mounted and os.geteuid() == 0:
        pytest.skip("root without a tmpfs: no way to make the store unwritable for real")
    shutil.copytree(store / "tensors", tensors, dirs_exist_ok=True)
    shutil.rmtree(store / "tensors")
    deltas = tensors / "default" / "deltas"
    filler = tensors / "filler"

    def inject() -> None:
        if not mounted:
            deltas.chmod(0o500)
            return
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass

    def clear() -> None:
        filler.unlink(missing_ok=True)
        deltas.chmod(0o700)

    yield store, tensors, inject, clear
    if mounted:
        subprocess.run(["umount", "-l", str(tensors)], capture_output=True)


def test_a_rollback_the_store_interrupts_is_finished_by_the_next_worker(on_tmpfs, trained_llama_path):
    path, tensors, inject, clear = on_tmpfs
    with next_worker(path, trained_llama_path, tensor_dir=tensors) as runtime:
        store = runtime.store
        rolled, broken = breaking_edit(runtime)
        inject()  # the rollback itself writes no file; its first replay writes a delta: ENOSPC
        with pytest.raises(OSError):  # the task stops the worker and requeues the message
            rb.rollback_message(runtime, "job-1", {"request_id": "job-1", "edit": rolled}, budget=None)
        assert store.edit(rolled).status == ROLLED_BACK
        assert store.job("job-1").status == RUNNING  # unfinished, in the ledger
        assert not store.events(rolled, kinds=[rb.ROLLBACK_DONE])
        consistent(runtime)  # W_m in RAM is the ledger's: the failed replay left its columns as they were
    clear()
    with next_worker(path, trained_llama_path, tensor_dir=tensors) as runtime:  # the next worker, at start
        runtime.resume()
        store = runtime.store
        assert store.job("job-1").status == DONE and store.jobs("default", status=[PENDING, RUNNING]) == []
        done = store.events(rolled, kinds=[rb.ROLLBACK_DONE])
        assert len(done) == 1 and set(broken) <= set(done[0].detail["replayed"]) | set(done[0].detail["failed"])
        assert done[0].detail["replayed"] and not done[0].detail["failed"]
        consistent(runtime)
        # the requeued message, delivered again, finds the job done and changes nothing
        version = store.get_memory("default").version
        outcome, more = rb.rollback_message(runtime, "job-1", {"request_id": "job-1", "edit": rolled}, budget=None)
        assert outcome["status"] == "done" and more is None and store.get_memory("default").version == version
