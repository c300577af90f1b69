"""zsRE evaluation as the field scores it (EasyEdit; MEMOIR's sequential setting).

Edit the first T valid records one after another (`src` → `alt`), then score all T:

- Rel: teacher-forced share of `alt` tokens predicted right after `src`;
- Gen: the same after `rephrase`;
- Loc: share of `loc_ans` positions after `loc` whose argmax is the unedited model's.

Each is the mean over the T records; `avg` is the mean of the three. Beside them, what a user
reads, from greedy answers (`memoir.metrics`): `rel_gen` (the answer to `src` begins with `alt`),
`gen_gen` (likewise after `rephrase`), `loc_gen` (the first tokens answered to `loc` are the
unedited model's) and their mean `avg_gen`. With `every`, the same
scores are also taken after every `every` edits (on the edits applied so far): the curve of
quality against the number of edits T.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from memoir import metrics
from memoir.config import MemoirConfig
from memoir.editor import Editor, EditRefusedError
from memoir.prompts import InvalidEditError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("src", "alt", "rephrase", "loc", "loc_ans")
GENERATED_SCORES = ("rel_gen", "gen_gen", "loc_gen", "avg_gen")
BACKGROUND_RECORDS = 100

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ZsreCase:
    """One valid zsRE record: edit `prompt` → `target`; `rephrase` for Gen; `loc` → `loc_ans` for Loc."""

    prompt: str
    target: str
    rephrase: str
    loc: str
    loc_ans: str
    subject: str = ""

    @classmethod
    def from_record(cls, record: Any) -> "ZsreCase | None":
        """The case of a record, or None when a field is missing, not text, or empty."""
        if not isinstance(record, dict):
            return None
        values = [record.get(name) for name in REQUIRED_FIELDS]
        if not all(isinstance(v, str) and v.strip() for v in values):
            return None
        subject = record.get("subject")
        return cls(*values, subject=subject.strip() if isinstance(subject, str) else "")


def read_records(path: str | os.PathLike) -> list[Any]:
    """The records of a zsRE file: JSON Lines (one object per line) or one JSON array.

    A line that is not valid JSON becomes None (an invalid record, counted as skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        return data
    records: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(None)
    return records


def split_records(records: Sequence[Any], limit: int | None, background_size: int = BACKGROUND_RECORDS,
                  distinct_subjects: bool = False) -> tuple[list[ZsreCase], int, list[str]]:
    """The first `limit` valid cases (all when None), the count of invalid records skipped before
    the last of them, and the background prompts: the `loc` questions of the up to
    `background_size` records that follow the edited ones. With `distinct_subjects`, a record
    whose subject an earlier case has (a later, conflicting edit of the same fact) is passed over."""
    cases: list[ZsreCase] = []
    subjects: set[str] = set()
    skipped = 0
    end = 0  # records[:end] were read for the cases
    for record in records:
        if limit is not None and len(cases) >= limit:
            break
        end += 1
        case = ZsreCase.from_record(record)
        if case is None:
            skipped += 1
        elif not (distinct_subjects and case.subject and case.subject in subjects):
            cases.append(case)
            subjects.add(case.subject)
    background = [r["loc"] for r in records[end : end + background_size]
                  if isinstance(r, dict) and isinstance(r.get("loc"), str) and r["loc"].strip()]
    return cases, skipped, background


@contextlib.contextmanager
def retrieval_threshold(editor: Editor, threshold: float | None) -> Iterator[None]:
    """Score with another retrieval threshold within the block (the edits do not depend on it)."""
    memory = editor.memory
    previous = memory.threshold
    memory.threshold = previous if threshold is None else threshold
    memory.last = None
    try:
        yield
    finally:
        memory.threshold = previous
        memory.last = None


def score(editor: Editor, cases: Sequence[ZsreCase], threshold: float | None = None) -> dict[str, Any]:
    """Rel, Gen, Loc (and their average) of the memory as it is now, over `cases`;
    plus how often each kind of prompt retrieved an edit: its own (src, rephrase), any (loc).
    `threshold` scores with another retrieval threshold than the memory's."""
    with retrieval_threshold(editor, threshold):
        return _score(editor, cases)


def _score(editor: Editor, cases: Sequence[ZsreCase]) -> dict[str, Any]:
    prompts = [c.prompt for c in cases]
    targets = [c.target for c in cases]
    rel, rel_found = metrics.accuracy(editor, prompts, targets, with_retrieval=True)
    gen, gen_found = metrics.accuracy(editor, [c.rephrase for c in cases], targets, with_retrieval=True)
    locs, answers = [c.loc for c in cases], [c.loc_ans for c in cases]
    loc = metrics.locality(editor, locs, answers)
    _, loc_found = metrics.accuracy(editor, locs, answers, with_retrieval=True)
    rel_gen = metrics.answers_with_target(editor, prompts, targets)
    gen_gen = metrics.answers_with_target(editor, [c.rephrase for c in cases], targets)
    loc_gen = metrics.generation_unchanged(editor, locs)
    n = len(cases)
    out = {"rel": sum(rel) / n, "gen": sum(gen) / n, "loc": sum(loc) / n}
    out["avg"] = (out["rel"] + out["gen"] + out["loc"]) / 3
    out.update(rel_gen=sum(rel_gen) / n, gen_gen=sum(gen_gen) / n, loc_gen=sum(loc_gen) / n)
    out["avg_gen"] = (out["rel_gen"] + out["gen_gen"] + out["loc_gen"]) / 3
    out["retrieval"] = {
        "rel": sum(i in found for i, found in enumerate(rel_found)) / n,
        "gen": sum(i in found for i, found in enumerate(gen_found)) / n,
        "loc": sum(bool(found) for found in loc_found) / n,
    }
    return out


def _scores(editor: Editor, cases: Sequence[ZsreCase], thresholds: Sequence[float]) -> dict[str, Any]:
    """The scores at the memory's threshold, and under `by_threshold` at each of `thresholds`."""
    out = score(editor, cases)
    if thresholds:
        out["by_threshold"] = {f"{t:g}": score(editor, cases, t) for t in thresholds}
    return out


def evaluate(model: nn.Module, tokenizer, records: Sequence[Any], limit: int | None = 100,
             config: MemoirConfig | None = None, background_prompts: Sequence[str] | None = None,
             every: int | None = None, progress: Progress | None = None,
             thresholds: Sequence[float] = (), distinct_subjects: bool = False) -> dict[str, Any]:
    """Sequential zsRE evaluation: T = `limit` edits one after another on a new memory, then score all T.

    The model keeps the new memory attached afterwards (evaluate a fresh load each time).
    Edit i has edit id i (its position among the valid cases). An edit the editor refuses
    (non-finite loss, untokenizable target) is counted in `refused` and still scored (as the
    model without it). `seconds_per_edit` is the mean time of training and applying an edit,
    scoring excluded. With `every`, `curve` holds the scores after every `every` edits and at T.
    With `thresholds`, each score (final and curve points) is also taken at each of those retrieval
    thresholds, under `by_threshold` (one edit run serves them all: training ignores the threshold).
    `distinct_subjects` edits only the first record of each subject (`split_records`).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    cases, skipped, background = split_records(records, limit, distinct_subjects=distinct_subjects)
    if not cases:
        raise ValueError("no valid zsRE record to edit (each needs non-empty src, alt, rephrase, loc, loc_ans)")
    if background_prompts is not None:
        background = list(background_prompts)
    if not background:  # fewer records than asked: fall back on the edited records' own loc questions
        background = [c.loc for c in cases]
    editor = Editor.create(model, tokenizer, background, config)
    total = len(cases)
    edit_seconds = 0.0
    refused = 0
    curve: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        started = time.perf_counter()
        try:
            editor.edit(case.prompt, case.target, edit_id=i, score=False)
        except (EditRefusedError, InvalidEditError) as exc:
            refused += 1
            log.warning("edit %d (%r -> %r) refused: %s", i, case.prompt, case.target, exc)
        edit_seconds += time.perf_counter() - started
        done = i + 1
        if every is not None and (done % every == 0 or done == total):
            point = _scores(editor, cases[:done], thresholds)
            curve.append({"edits": done, **point})
            log.info("after %d edits: rel %.3f gen %.3f loc %.3f", done, point["rel"], point["gen"], point["loc"])
        if progress is not None:
            progress(done, total)
    final = curve[-1] if curve else {"edits": total, **_scores(editor, cases, thresholds)}
    result: dict[str, Any] = {
        "edits": total,
        "rel": final["rel"],
        "gen": final["gen"],
        "loc": final["loc"],
        "avg": final["avg"],
        **{name: final[name] for name in GENERATED_SCORES},
        "retrieval": final["retrieval"],
        **({"by_threshold": final["by_threshold"]} if thresholds else {}),
        "seconds_per_edit": edit_seconds / total,
        "skipped": skipped,
        "refused": refused,
        "background_prompts": len(editor.background_prompts),
        "distinct_masks": len(editor.memory.index),
        "distinct_subjects": distinct_subjects,
        "config": editor.config.to_dict(),
    }
    if curve:
        result["curve"] = curve
    return result


__all__ = ["ZsreCase", "read_records", "split_records", "score", "evaluate", "REQUIRED_FIELDS"]
