"""benchmarks/bench_stream: the ledger is the cursor (a stopped run continues, nothing applied twice),
results are written at each point, a store of another stream is refused; deep_bytes counts a
tensor's storage once."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_stream, common
from store import Store


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS_DIR", out)
    monkeypatch.setattr(bench_stream, "RESULTS_DIR", out)
    return out


def _run(store, edits: int, points: str, seed: int = 0) -> None:
    bench_stream.main(["--model", "builtin", "--edits", str(edits), "--points", points, "--sample", "3",
                       "--store", str(store), "--name", "t", "--lookalikes", "5", "--seed", str(seed)])


def test_resumes_from_its_ledger_and_keeps_earlier_points(tmp_path, results_dir):
    store = tmp_path / "store"
    _run(store, 3, "2")
    first = json.loads((results_dir / "t.json").read_text())
    assert sorted(first["points"], key=int) == ["2", "3"]
    _run(store, 5, "2,4")  # continues at edit 3: the ledger says 3 are done
    result = json.loads((results_dir / "t.json").read_text())
    assert sorted(result["points"], key=int) == ["2", "3", "4", "5"]
    assert result["points"]["2"] == first["points"]["2"]  # kept, not recomputed
    assert [(s["from"], s["to"]) for s in result["segments"]] == [(0, 3), (3, 5)]
    assert (results_dir / "t.png").stat().st_size > 0
    with Store.open(store) as opened:
        ids = [e.request_id for e in opened.edits(bench_stream.MEMORY_NAME)]
    assert ids == [bench_stream.request_id(0, i) for i in range(5)]  # each once, in stream order
    point = result["points"]["5"]
    assert point["applied"] == 5 and point["sample"]["all"]["n"] == 3
    assert point["first"]["all"]["n"] == 3 and point["index"]["distinct_masks"] == 5
    assert 0.0 <= point["unrelated"]["nq"]["share"] <= 1.0 and point["retrieval_ms"]["batch_16"] > 0
    assert 0.0 <= point["unrelated"]["lookalike"]["answer_changed"] <= 1.0
    _run(store, 5, "2,4")  # nothing left to do: no edit applied again
    with Store.open(store) as opened:
        assert len(opened.edits(bench_stream.MEMORY_NAME)) == 5


def test_refuses_a_store_of_another_stream(tmp_path, results_dir):
    store = tmp_path / "store"
    _run(store, 1, "1")
    with pytest.raises(SystemExit, match="not this stream"):
        _run(store, 2, "2", seed=1)
    with Store.open(store) as opened:
        assert len(opened.edits(bench_stream.MEMORY_NAME)) == 1
    _run(store, 2, "2")  # the refusal released the memory's writer lock: its own stream goes on
    with Store.open(store) as opened:
        assert len(opened.edits(bench_stream.MEMORY_NAME)) == 2


def test_deep_bytes_counts_shared_storage_once():
    class Holder:
        def __init__(self) -> None:
            self.a = torch.zeros(100, dtype=torch.float32)
            self.view = self.a[:10]
            self.keys = [(1, 2, 3)]

    got = bench_stream.deep_bytes(Holder())
    assert got["tensor_bytes"] == 400
    assert got["python_bytes"] > 0 and got["bytes"] == got["tensor_bytes"] + got["python_bytes"]
