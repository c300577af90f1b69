"""memoir.synthetic: the edit stream of the 10 000-edit benchmark (split first, then template facts)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from memoir import synthetic
from memoir.evaluate import ZsreCase

N = 10_000


@pytest.fixture(scope="module")
def split():
    return synthetic.split_records()


@pytest.fixture(scope="module")
def stream10k():
    return synthetic.records(N, seed=0)


def test_same_seed_same_stream_other_seed_other_stream(stream10k):
    assert synthetic.records(N, seed=0) == stream10k
    other = synthetic.records(N, seed=1)
    assert len(other) == N
    split_size = len(synthetic.split_records())
    assert other[:split_size] == stream10k[:split_size]  # the split does not depend on the seed
    assert sum(a == b for a, b in zip(other[split_size:], stream10k[split_size:])) == 0


def test_a_prefix_is_the_start_of_a_longer_stream(stream10k):
    assert synthetic.records(1200, seed=0) == stream10k[:1200]


def test_the_split_comes_first_unchanged_and_in_order(split, stream10k, zsre):
    valid = [r for r in zsre if ZsreCase.from_record(r) is not None]
    assert split == valid  # the split's valid records, as memoir.evaluate reads them
    assert len(split) < len(zsre)  # the shipped split has invalid records (an empty alt): skipped
    assert stream10k[: len(split)] == split
    assert not any(r.get("synthetic") for r in stream10k[: len(split)])
    assert all(r["synthetic"] for r in stream10k[len(split):])


def test_every_synthetic_prompt_and_subject_is_new(split, stream10k):
    made = stream10k[len(split):]
    prompts = [p for r in made for p in (r["src"], *r["rephrases"])]
    assert len(prompts) == len(set(prompts)) > 2 * len(made)
    split_prompts = {p for r in split for p in (r["src"], r["rephrase"])}
    assert not split_prompts & set(prompts)
    subjects = [r["subject"] for r in made]
    assert len(subjects) == len(set(subjects))
    assert not {r["subject"] for r in split} & set(subjects)


def test_records_have_the_zsre_shape(split, stream10k):
    locs = {(r["loc"], r["loc_ans"]) for r in split}
    for r in stream10k[len(split):]:
        case = ZsreCase.from_record(r)
        assert case is not None and case.subject == r["subject"]
        assert r["rephrase"] == r["rephrases"][0] and 1 <= len(r["rephrases"]) <= 2
        assert r["src"] not in r["rephrases"]
        assert r["subject"] in r["src"] and all(r["subject"] in p for p in r["rephrases"])
        assert (r["loc"], r["loc_ans"]) in locs  # locality on the split's NQ questions
        assert r["loc"].startswith("nq question:")
        assert 1 <= len(r["alt"].split()) <= 3 and len(r["alt"]) <= 30  # short answers
        assert r["alt"] != r["subject"]


def test_relations_and_phrasings(split, stream10k):
    assert len(synthetic.RELATIONS) >= 6
    assert all(2 <= len(rel.phrasings) <= 3 for rel in synthetic.RELATIONS)
    counts = Counter(r["relation"] for r in stream10k[len(split):])
    assert set(counts) == {rel.name for rel in synthetic.RELATIONS}
    assert min(counts.values()) > 0.5 * max(counts.values())  # none left out
    # each relation's edited phrasing varies (the phrasings are shuffled per record)
    by_relation: dict[str, set[str]] = {}
    for r in stream10k[len(split):]:
        by_relation.setdefault(r["relation"], set()).add(r["src"].replace(r["subject"], "{}").lower())
    assert all(len(v) >= 2 for v in by_relation.values())


def test_include_split_false_and_bad_input(split):
    only = synthetic.records(50, seed=3, include_split=False)
    assert len(only) == 50 and all(r["synthetic"] for r in only)
    assert synthetic.records(0) == []
    assert synthetic.records(10, seed=0) == split[:10]
    with pytest.raises(ValueError, match="count"):
        synthetic.records(-1)
    with pytest.raises(ValueError, match="split record 1 is not a zsRE record"):
        synthetic.records(5, split=[split[0], {"src": "x"}])
    with pytest.raises(ValueError, match="empty"):
        synthetic.records(5, split=[])
    with pytest.raises(ValueError, match="2 or 3 phrasings"):
        synthetic.Relation("x", synthetic.person, synthetic.place, ["only {}"])


def test_command_line_writes_json_lines(split):
    out = subprocess.run([sys.executable, "-m", "memoir.synthetic", "--count", str(len(split) + 5), "--seed", "0"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [json.loads(line) for line in out] == synthetic.records(len(split) + 5, seed=0)


def test_collisions_are_drawn_again(split, monkeypatch):
    """With a name space so small that draws collide, every subject and prompt is still new."""
    names = [f"Name{i}" for i in range(40)]
    relation = synthetic.Relation("r", lambda rng: rng.choice(names), lambda rng: "x", ["Who is {}?", "Tell me {}?"])
    monkeypatch.setattr(synthetic, "RELATIONS", (relation,))
    made = synthetic.records(30, seed=0, split=split[:3], include_split=False)
    assert len({r["subject"] for r in made}) == 30
    assert len({p for r in made for p in (r["src"], r["rephrase"])}) == 60
