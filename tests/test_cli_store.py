"""`memoir apply`, `memoir generate` and `memoir ledger list|show|verify`, run as real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memoir import MemoirConfig
from pipeline.cli import main
from store import Store
from workers.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_store import D_FFN, D_MODEL, K, apply_edit, make_state  # noqa: E402


def memoir(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `memoir` command in a new process."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    if check:
        assert done.returncode == 0, done.stderr
    return done


def last_json(output: str):
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture
def synthetic_store(tmp_path) -> Path:
    """A store with 3 applied edits, 1 failed and 1 queued (hand-made deltas, no model)."""
    path = tmp_path / "store"
    with Store.open(path) as store:
        store.create_memory("default", make_state(), "synthetic")
        weight = torch.zeros(D_MODEL, D_FFN)
        for n in range(3):
            apply_edit(store, weight, n)
        failed, _ = store.record_request("default", "will-fail", "a prompt", "a target")
        store.mark_failed(failed, "refused by the acceptance policy: rel 0.1 < 0.9")
        store.record_request("default", "waiting", "queued prompt", "queued target")
    return path


def run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


# --------------------------------------------------------------------------- ledger views


def test_ledger_commands_do_not_import_torch(synthetic_store):
    script = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "for args in (['list', '--json'], ['show', '1', '--json'], ['verify', '--json']):\n"
        "    try:\n"
        "        main(['ledger', *args, '--store', sys.argv[1]])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (args, exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'memoir') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", script, str(synthetic_store)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_ledger_list(synthetic_store):
    result = run("ledger", "list", "--store", str(synthetic_store), "--json")
    assert result.exit_code == 0
    edits = last_json(result.output)
    assert [e["seq"] for e in edits] == [1, 2, 3, 4, 5]
    assert [e["status"] for e in edits] == ["applied"] * 3 + ["failed", "queued"]
    assert set(edits[0]) >= {"id", "request_id", "seq", "status", "prompt", "target", "created_at"}
    assert edits[0]["prompt"] == "prompt 0" and edits[3]["request_id"] == "will-fail"
    failed = last_json(run("ledger", "list", "--store", str(synthetic_store), "--status", "failed", "--json").output)
    assert [e["request_id"] for e in failed] == ["will-fail"]
    newest = last_json(run("ledger", "list", "--store", str(synthetic_store), "--limit", "2", "--json").output)
    assert [e["seq"] for e in newest] == [4, 5]
    table = run("ledger", "list", "--store", str(synthetic_store)).output
    assert "prompt 2 → target 2" in table and "queued" in table and table.splitlines()[0].split()[:3] == ["id", "seq",
                                                                                                        "memory"]
    bad = run("ledger", "list", "--store", str(synthetic_store), "--status", "done")
    assert bad.exit_code != 0 and "unknown status" in bad.output


def test_ledger_show(synthetic_store):
    result = run("ledger", "show", "2", "--store", str(synthetic_store), "--json")
    assert result.exit_code == 0
    edit = last_json(result.output)
    with Store.open(synthetic_store) as store:
        expected = store.edit(2)
    assert edit["mask"] == expected.mask and len(edit["mask"]) == K
    assert edit["loss"] == 0.5 and edit["seconds"] == 0.01 and edit["steps"] == 1
    assert [e["kind"] for e in edit["events"]] == ["queued", "applying", "applied"]
    assert edit["delta_sha256"] == expected.delta_sha256
    text = run("ledger", "show", "2", "--store", str(synthetic_store)).output
    assert f"mask: {K} columns" in text and "applied" in text
    missing = run("ledger", "show", "99", "--store", str(synthetic_store))
    assert missing.exit_code != 0 and "no edit with id 99" in missing.output


def test_ledger_verify_finds_a_corrupted_delta(synthetic_store):
    ok = run("ledger", "verify", "--store", str(synthetic_store))
    assert ok.exit_code == 0 and ok.output.strip().endswith("ok")
    with Store.open(synthetic_store) as store:
        edit = store.edit(3)
    path = synthetic_store / "tensors" / edit.delta_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    broken = memoir("ledger", "verify", "--store", str(synthetic_store), check=False)
    assert broken.returncode == 1  # a check that failed (not invalid input, not a service down)
    assert f"edit {edit.id}" in broken.stdout and "corrupt" in broken.stdout and "problem" in broken.stderr
    report = last_json(memoir("ledger", "verify", "--store", str(synthetic_store), "--json", check=False).stdout)
    assert report["ok"] is False and len(report["errors"]) == 1


# ------------------------------------------------------------------------ apply, generate


@pytest.mark.slow
def test_apply_then_generate_in_a_new_process(tiny_model_factory, zsre, tmp_path):
    model, tokenizer = tiny_model_factory("llama")
    model_path = model.config._name_or_path
    store_path = tmp_path / "store"
    # the memory is made with a short optimisation first; `memoir apply` uses the stored config
    Runtime.open(model, str(store_path), tokenizer=tokenizer, config=MemoirConfig(n_iter=5, check_size=1)).close()
    lines = [json.dumps(r) for r in zsre[:4]]
    lines += ["{not json", json.dumps({"prompt": "no target"}), lines[0],
              json.dumps({"prompt": "Who wrote Dune?", "target": "Frank Herbert", "id": "custom-1"})]
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(lines) + "\n")

    done = memoir("apply", "--model", model_path, "--file", str(edits), "--store", str(store_path), "--json",
                  check=False)
    summary = last_json(done.stdout)
    assert done.returncode == 2  # two lines were refused (invalid input): the valid ones are applied all the same
    assert (summary["applied"], summary["failed"], summary["skipped"]) == (5, 0, 3)
    assert len(summary["ids"]) == 6 and summary["ids"][0] == summary["ids"][4]  # the repeated line: one edit
    assert summary["seconds_per_edit"] > 0
    assert "line 5" in done.stderr and "line 6" in done.stderr
    again = last_json(memoir("apply", "--model", model_path, "--file", str(edits), "--store", str(store_path),
                             "--json", check=False).stdout)
    assert (again["applied"], again["skipped"]) == (0, 8)

    with Store.open(store_path) as store:
        edits_ = store.edits("default")
        assert [e.status for e in edits_] == ["applied"] * 5
        assert edits_[0].rephrases == [zsre[0]["rephrase"]] and edits_[0].metadata["subject"] == zsre[0]["subject"]
        assert store.edit_by_request("custom-1") is not None
        assert store.verify().ok
        # each edit's scores: teacher-forced and from generated answers
        assert set(edits_[0].scores) >= {"rel", "gen", "loc", "rel_gen", "gen_gen", "loc_gen"}
    # the threshold was fitted to the model (no --threshold) and the ledger shows it
    [memory] = last_json(memoir("ledger", "memories", "--store", str(store_path), "--json").stdout)
    assert memory["name"] == "default" and memory["live_edits"] == 5
    assert memory["threshold"] == memory["threshold_fit"]["threshold"] > memory["threshold_fit"]["chance_mean"]
    assert f"threshold {memory['threshold']} (fitted" in memoir("ledger", "memories", "--store", str(store_path)).stdout

    prompts = [r["src"] for r in zsre[:4]] + ["Who wrote Dune?", zsre[0]["loc"]]
    with Runtime.open(model, str(store_path), tokenizer=tokenizer, readonly=True) as runtime:
        with_memory = runtime.generate(prompts, max_new_tokens=6)
        base = runtime.generate(prompts, max_new_tokens=6, use_memory=False)
    out = last_json(memoir("generate", "--model", model_path, "--store", str(store_path), "--max-new-tokens", "6",
                           "--json", *prompts).stdout)
    assert out == {"outputs": with_memory}
    out = last_json(memoir("generate", "--model", model_path, "--store", str(store_path), "--max-new-tokens", "6",
                           "--no-memory", "--json", *prompts).stdout)
    assert out == {"outputs": base}
    assert with_memory != base  # the edits changed some answers


def test_apply_refuses_a_store_made_on_another_model(tiny_model_factory, tmp_path):
    model, tokenizer = tiny_model_factory("llama")
    other, _ = tiny_model_factory("llama", hidden=32)
    Runtime.open(model, str(tmp_path / "store"), tokenizer=tokenizer, config=MemoirConfig(n_iter=5)).close()
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    done = memoir("apply", "--model", other.config._name_or_path, "--file", str(edits), "--store",
                  str(tmp_path / "store"), check=False)
    assert done.returncode != 0 and "does not fit" in done.stderr and "hidden_size" in done.stderr
