"""zsRE evaluation (memoir.evaluate) and the `memoir eval` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from memoir import Editor, MemoirConfig
from memoir.evaluate import GENERATED_SCORES, ZsreCase, evaluate, read_records, score, split_records
from workers.eval_command import eval_command


def record(i: int, **changes) -> dict:
    base = {"src": f"question {i}?", "alt": f"new {i}", "rephrase": f"rephrased {i}?", "loc": f"loc {i}?",
            "loc_ans": f"ans {i}", "answers": [f"old {i}"], "subject": f"s{i}", "pred": f"p{i}"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


# ------------------------------------------------------------------------------------ records


def test_read_records_jsonl_array_and_bad_lines(tmp_path):
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(record(0)) + "\n\nnot json\n" + json.dumps(record(1)) + "\n")
    assert read_records(lines) == [record(0), None, record(1)]
    array = tmp_path / "d.json"
    array.write_text(json.dumps([record(0), record(1)]))
    assert read_records(array) == [record(0), record(1)]


def test_split_skips_and_counts_invalid_records_and_takes_the_background_after():
    records = [record(0), record(1, alt=""), record(2, rephrase=...), None, record(4, loc_ans=7), record(5),
               record(6, alt="   "), record(7), record(8), record(9, loc="")] + [record(i) for i in range(10, 20)]
    cases, skipped, background = split_records(records, limit=3)
    assert [c.prompt for c in cases] == ["question 0?", "question 5?", "question 7?"]
    assert cases[0] == ZsreCase("question 0?", "new 0", "rephrased 0?", "loc 0?", "ans 0", subject="s0")
    assert skipped == 5  # records 1, 2, 3, 4, 6
    assert background[:2] == ["loc 8?", "loc 10?"]  # record 9's loc is empty
    assert len(background) == 11  # records 8 and 10..19
    cases, skipped, background = split_records(records, limit=3, background_size=2)
    assert background == ["loc 8?"]
    cases, skipped, background = split_records(records, limit=None)
    assert len(cases) == 14 and skipped == 6 and background == []


def test_split_with_distinct_subjects_keeps_the_first_record_of_each_subject():
    records = [record(0), record(1, subject="s0"), record(2), record(3, subject="s2"), record(4), record(5)]
    cases, skipped, background = split_records(records, limit=3, distinct_subjects=True)
    assert [c.prompt for c in cases] == ["question 0?", "question 2?", "question 4?"]
    assert skipped == 0 and background == ["loc 5?"]
    assert [c.prompt for c in split_records(records, limit=3)[0]] == ["question 0?", "question 1?", "question 2?"]


# ------------------------------------------------------------------------------------ scoring


def test_score_without_edits_is_the_base_model(trained_llama, zsre):
    """No edits: Loc is exactly 1, Rel on the trained answers is high, on the new targets low."""
    model, tokenizer = trained_llama
    cases, _, background = split_records(zsre, limit=8)
    editor = Editor.create(model, tokenizer, background, MemoirConfig(layer=2, top_k=146))
    new = score(editor, cases)
    assert new["loc"] == 1.0
    assert new["rel"] < 0.3
    assert new["retrieval"] == {"rel": 0.0, "gen": 0.0, "loc": 0.0}
    old = score(editor, [ZsreCase(r["src"], r["answers"][0], r["rephrase"], r["loc"], r["loc_ans"]) for r in zsre[:8]])
    assert old["rel"] > 0.8  # the tiny model learnt src → answers[0]
    assert old["avg"] == pytest.approx((old["rel"] + old["gen"] + old["loc"]) / 3)


def test_sequential_evaluation_edits_then_scores_all(trained_llama, zsre):
    model, tokenizer = trained_llama
    records = zsre[52:59]  # record 54 has an empty alt
    calls = []
    result = evaluate(model, tokenizer, records, limit=5, config=MemoirConfig(layer=2, top_k=146, threshold=0.4), every=2,
                      progress=lambda done, total: calls.append((done, total)), thresholds=(0.4, 1.0))
    assert result["edits"] == 5 and result["skipped"] == 1 and result["refused"] == 0
    assert calls == [(i, 5) for i in range(1, 6)]
    assert [p["edits"] for p in result["curve"]] == [2, 4, 5]
    assert result["curve"][-1]["rel"] == result["rel"]
    assert result["rel"] >= 0.8 and result["retrieval"]["rel"] == 1.0
    assert 0.0 <= result["gen"] <= 1.0 and result["loc"] >= 0.5
    assert result["avg"] == pytest.approx((result["rel"] + result["gen"] + result["loc"]) / 3)
    assert result["seconds_per_edit"] > 0
    assert result["config"]["layer"] == 2 and result["config"]["top_k"] == 146
    # other thresholds score the same edits: 0.4 is the memory's own; at 1.0 only identical masks match
    assert {k: v for k, v in result["by_threshold"]["0.4"].items()} == {
        k: result[k] for k in ("rel", "gen", "loc", "avg", "retrieval", *GENERATED_SCORES)}
    # generated answers: the edited prompts answer their targets, unrelated ones as before
    assert result["rel_gen"] >= 0.8 and 0.0 <= result["gen_gen"] <= 1.0 and result["loc_gen"] >= 0.5
    assert result["avg_gen"] == pytest.approx((result["rel_gen"] + result["gen_gen"] + result["loc_gen"]) / 3)
    strict = result["by_threshold"]["1"]
    assert strict["retrieval"]["rel"] == 1.0 and strict["retrieval"]["loc"] == 0.0 and strict["loc"] == 1.0
    assert result["config"]["threshold"] == 0.4
    # the background: the loc questions of the record after the edited ones (only one is left)
    assert result["background_prompts"] == 1


def test_evaluation_refuses_data_without_a_valid_record(trained_llama):
    model, tokenizer = trained_llama
    with pytest.raises(ValueError, match="no valid zsRE record"):
        evaluate(model, tokenizer, [record(0, alt=""), None], limit=2)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_json_and_plot(tmp_path, zsre):
    data = tmp_path / "zsre.jsonl"
    rows = [zsre[0], {"src": "no target here"}, zsre[1], zsre[2]] + zsre[3:10]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot = tmp_path / "curve.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval", "--model", "builtin", "--data", str(data), "--limit", "3",
         "--layer", "2", "--top-k", "146", "--threshold", "0.4", "--seed", "1", "--json", "--plot", str(plot)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("edits", "rel", "gen", "loc", "avg", "seconds_per_edit", "config"):
        assert key in out
    assert out["edits"] == 3 and out["skipped"] == 1
    assert out["config"]["seed"] == 1 and out["config"]["threshold"] == 0.4
    assert out["rel"] >= 0.8
    assert "editing" in done.stderr  # the progress bar
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["edits"] for p in out["curve"]] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/zsre.jsonl"], "cannot read"),
    (["--threshold", "1.5"], "Invalid value for '--threshold'"),  # refused when the command line is read
    (["--layer", "9"], "layer 9 does not exist"),
])
def test_cli_errors_are_clear(args, message, tmp_path, zsre):
    data = tmp_path / "zsre.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in zsre[:5]))
    argv = ["--model", "builtin", "--data", str(data), "--limit", "1"] + args
    result = CliRunner().invoke(eval_command, argv)
    assert result.exit_code != 0
    assert message in result.output


def test_cli_rejects_data_without_valid_records(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(record(0, alt="")) + "\n{broken\n")
    result = CliRunner().invoke(eval_command, ["--model", "builtin", "--data", str(data)])
    assert result.exit_code != 0
    assert "no valid zsRE record" in result.output


def test_cli_unknown_model_fails_cleanly(tmp_path, zsre):
    data = tmp_path / "zsre.jsonl"
    data.write_text(json.dumps(zsre[0]))
    result = CliRunner().invoke(eval_command, ["--model", str(tmp_path / "no-model"), "--data", str(data)])
    assert result.exit_code == 2
    assert f"model {str(tmp_path / 'no-model')!r}: no such file or directory" in result.output
