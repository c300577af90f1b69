"""Serving in-process: snapshots at a ledger seq, `load` (pinned or newest), `refresh`, `Follower`."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from memoir import MemoirConfig
from pipeline import settings
from pipeline.local_redis import redis_for
from store import Store, StoreError, UnknownMemoryError
from store.snapshots import ledger_mark, load_snapshot
from workers.runtime import Runtime
from serving.follower import Follower
from serving.model import load
from workers.status_mirror import MirroringStore, StatusBoard

FAST = MemoirConfig(n_iter=5, check_size=1)
REDIS_URL = "redis://127.0.0.1:6379/14"
# On the 512-wide tiny model, masks of unrelated prompts overlap an edit's by 0.3-0.6: at the
# paper's threshold 0.4 most of them retrieve some edit. 0.9 keeps retrieval to the edit prompts.
SERVED = MemoirConfig(check_size=1, threshold=0.9)


def edit(runtime: Runtime, record: dict, request_id: str) -> int:
    outcome = runtime.apply_request({"prompt": record["src"], "target": record["alt"], "request_id": request_id})
    assert outcome["status"] == "applied", outcome
    return outcome["edit_id"]


def roll_back(runtime: Runtime, edit_id: int) -> None:
    """Take one edit out (its own delta from its own columns), as a rollback commits it."""
    record = runtime.store.edit(edit_id)
    runtime.editor.remove(record.id, runtime.store.load_delta(record))
    runtime.store.mark_rolled_back(record, "test")


def replay(runtime: Runtime, edit_id: int) -> None:
    """Re-optimise one live edit from the current memory; its new delta replaces the recorded one."""
    record = runtime.store.edit(edit_id)
    runtime.editor.remove(record.id, runtime.store.load_delta(record))
    result = runtime.editor.train(record.prompt, record.target, record.id, record.unrelated)
    runtime.editor.apply(result)
    runtime.store.mark_replayed(record, result)


def live(runtime: Runtime) -> tuple[torch.Tensor, set[int], int]:
    state = runtime.state()
    return state.weight.clone(), set(state.masks), runtime.store.get_memory(runtime.name).version


def test_a_snapshot_is_the_memory_as_it_was_at_its_seq(tiny_llama, zsre, tmp_path):
    model, tokenizer = tiny_llama
    runtime = Runtime.open(model, str(tmp_path / "store"), name="snap", tokenizer=tokenizer, config=FAST,
                           checkpoint_every=3)
    store = runtime.store
    expected = {0: live(runtime)}  # seq -> the memory just before the next edit entered the ledger
    for n in range(4):
        edit(runtime, zsre[n], f"e{n}")
        expected[n + 1] = live(runtime)
    roll_back(runtime, 2)  # between seq 4 and 5: belongs to seq 4
    replay(runtime, 3)
    expected[4] = live(runtime)
    edit(runtime, zsre[4], "e4")
    expected[5] = live(runtime)
    failed = runtime.apply_request({"prompt": "Who?", "target": " ", "request_id": "blank"})
    assert failed["status"] == "failed" and failed["seq"] == 6
    roll_back(runtime, 1)
    expected[6] = live(runtime)
    assert [c.version for c in store.checkpoints("snap")] == [3, 7]  # v3 holds edit 2, later rolled back

    for seq, (weight, edits, version) in expected.items():
        snapshot, state = load_snapshot(store, "snap", seq)
        assert (snapshot.seq, snapshot.version) == (seq, version), seq
        assert set(state.masks) == edits == {e.id for e in snapshot.edits}, seq
        torch.testing.assert_close(state.weight, weight, rtol=0, atol=1e-6)
        for edit_id, mask in state.masks.items():
            assert mask.tolist() == store.edit(edit_id).mask
    assert [e.id for e in load_snapshot(store, "snap", 4)[0].edits] == [1, 4, 3]  # 3's replayed delta came last

    # newest = at the newest settled seq, through the store's own loading path: the same tensors
    newest, state = load_snapshot(store, "snap")
    assert newest.mark == ledger_mark(store, "snap") == (6, expected[6][2])
    assert torch.equal(state.weight, load_snapshot(store, "snap", 6)[1].weight)
    # a seq not settled yet (queued, or not there) is refused
    store.record_request("snap", "waiting", zsre[5]["src"], zsre[5]["alt"])
    assert ledger_mark(store, "snap")[0] == 6
    for bad in (7, 8, -1):
        with pytest.raises(StoreError, match="seq|at_seq"):
            load_snapshot(store, "snap", bad)
    runtime.close()


def test_prompts_are_formatted_as_at_edit_time(tiny_model_factory, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}]
    for fmt in ("plain", "chat"):
        model, tokenizer = tiny_model_factory("llama")
        tokenizer.chat_template = template
        Runtime.open(model, str(tmp_path / fmt), name="f", tokenizer=tokenizer,
                     config=MemoirConfig(prompt_format=fmt)).close()
        model, tokenizer = tiny_model_factory("llama")
        tokenizer.chat_template = template
        served = load(model, store=tmp_path / fmt, name="f", tokenizer=tokenizer)

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        bos = [tokenizer.bos_token_id] if fmt == "plain" and served.editor.codec.prepend_bos else []
        one = ids("[user] Who wrote Hamlet?\n[assistant]") if fmt == "chat" else bos + ids("Who wrote Hamlet?")
        assert served.prompt_ids("Who wrote Hamlet?") == one
        assert served.chat_ids(convo[1:]) == one  # one user turn: exactly an edit prompt
        whole = (ids("[system] Be brief.\n[user] Who wrote Hamlet?\n[assistant]") if fmt == "chat"
                 else bos + ids("Be brief.\nWho wrote Hamlet?"))
        assert served.chat_ids(convo) == whole
        served.close()


@pytest.fixture
def writer(trained_llama, tmp_path):
    """A writer runtime on the trained tiny Llama, its store publishing change notices when a board is set."""
    model, tokenizer = trained_llama
    store = MirroringStore.open(tmp_path / "store")
    runtime = Runtime.open(model, store, name="srv", tokenizer=tokenizer, config=SERVED)
    yield runtime
    runtime.close()
    store.close()


def answer(served, prompt: str, use_memory: bool = True) -> str:
    return served.generate([prompt], max_new_tokens=8, use_memory=use_memory)[0]


def test_load_pinned_or_newest_and_refresh(writer, trained_llama_path, zsre, tmp_path):
    a, b, c, other = zsre[0], zsre[1], zsre[2], zsre[300]
    first = edit(writer, a, "a")
    edit(writer, b, "b")
    newest = load(trained_llama_path, store=tmp_path / "store", name="srv")
    pinned = load(str(trained_llama_path), store=Store.open(tmp_path / "store"), name="srv", at_seq=1)
    base = {r["src"]: answer(newest, r["src"], use_memory=False) for r in (a, b, c, other)}
    assert (newest.seq, newest.version, newest.pinned) == (2, 2, False)
    assert (pinned.seq, pinned.pinned) == (1, True)
    assert answer(newest, a["src"]).startswith(a["alt"]) and answer(newest, b["src"]).startswith(b["alt"])
    assert answer(newest, other["src"]) == base[other["src"]]  # unrelated: the base model's answer
    assert newest.editor.memory.retrieved_edits() == [[]]
    assert answer(pinned, a["src"]).startswith(a["alt"]) and answer(pinned, b["src"]) == base[b["src"]]
    described = newest.describe()
    assert [e["target"] for e in described["edits"]] == [a["alt"], b["alt"]]
    assert described["config"]["top_k"] == writer.editor.config.top_k and described["at_seq"] is None

    assert not newest.refresh()  # nothing new
    edit(writer, c, "c")
    assert newest.refresh() and newest.seq == 3 and answer(newest, c["src"]).startswith(c["alt"])
    roll_back(writer, first)
    assert newest.refresh() and (newest.seq, newest.version) == (3, 4)
    assert answer(newest, a["src"]) == base[a["src"]]
    assert not pinned.refresh() and pinned.seq == 1 and answer(pinned, c["src"]) == base[c["src"]]
    assert answer(pinned, a["src"]).startswith(a["alt"])
    with pytest.raises(RuntimeError, match="pinned"):
        pinned.install(*load_snapshot(writer.store, "srv"))

    with pytest.raises(StoreError, match="no settled seq 9"):
        load(trained_llama_path, store=tmp_path / "store", name="srv", at_seq=9)
    with pytest.raises(UnknownMemoryError):
        load(trained_llama_path, store=tmp_path / "store", name="nothing")
    with pytest.raises(StoreError, match="no store at"):
        load(trained_llama_path, store=tmp_path / "elsewhere", name="srv")
    assert not (tmp_path / "elsewhere").exists()
    newest.close()
    pinned.close()
    pinned.store.close()


class Offers:
    """Collects what a Follower offers, and installs it (as the server's engine does)."""

    def __init__(self, served) -> None:
        self.served = served
        self.marks: list[tuple[int, int]] = []
        self.arrived = threading.Event()

    def __call__(self, snapshot, state) -> None:
        self.served.install(snapshot, state)
        self.marks.append(snapshot.mark)
        self.arrived.set()

    def wait(self, timeout: float) -> float:
        started = time.monotonic()
        assert self.arrived.wait(timeout), "no new snapshot was offered"
        self.arrived.clear()
        return time.monotonic() - started


def test_follower_polls_the_store_when_redis_is_down(writer, trained_llama_path, zsre, tmp_path):
    edit(writer, zsre[0], "a")
    served = load(trained_llama_path, store=tmp_path / "store", name="srv")
    offers = Offers(served)
    follower = Follower(served, offers, redis_url="redis://127.0.0.1:1/0", poll_seconds=0.2).start()
    try:
        time.sleep(0.5)
        assert not follower.listening and offers.marks == []
        edit(writer, zsre[1], "b")
        offers.wait(timeout=10)
        assert offers.marks == [(2, 2)] and answer(served, zsre[1]["src"]).startswith(zsre[1]["alt"])
    finally:
        follower.stop()
        served.close()
    with pytest.raises(ValueError, match="pinned"):
        Follower(load(trained_llama_path, store=tmp_path / "store", name="srv", at_seq=1), offers)


def test_follower_wakes_on_the_workers_notice(writer, trained_llama_path, zsre, tmp_path):
    with redis_for(REDIS_URL) as (url, _):
        client = settings.redis_client(url)
        writer.store.board = StatusBoard(client, "srv")  # what `memoir worker` sets: status mirror + notices
        edit(writer, zsre[0], "a")
        served = load(trained_llama_path, store=tmp_path / "store", name="srv")
        offers = Offers(served)
        follower = Follower(served, offers, redis_url=url, poll_seconds=60).start()  # no poll within the test
        try:
            deadline = time.monotonic() + 10
            while not follower.listening and time.monotonic() < deadline:
                time.sleep(0.05)
            assert follower.listening
            time.sleep(0.2)  # the subscription is registered before the notice is sent
            edit(writer, zsre[1], "b")
            assert offers.wait(timeout=10) < 5
            roll_back(writer, 1)
            offers.wait(timeout=10)
            assert offers.marks == [(2, 2), (2, 3)] and follower.notices >= 2
            assert answer(served, zsre[0]["src"]) == answer(served, zsre[0]["src"], use_memory=False)
        finally:
            follower.stop()
            served.close()
            client.flushdb()
            client.close()
