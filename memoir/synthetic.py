"""A stream of edit requests as a service would receive it: the zsRE split's records first, then
facts about invented entities made from templates (pure Python, seeded, no torch).

zsRE's dev split has only 451 records; a benchmark of 10 000 sequential edits needs more. Each
synthetic record states one relation of a new entity (a person, a company, a place, a species, a
book, a band...) in one of the relation's phrasings (`src`, the edited prompt) and keeps the others
(`rephrases`, the first also as `rephrase`) to score generalisation. Names and answers are drawn
from seeded syllable generators; locality prompts are the split's NQ questions. Records are
zsRE-shaped ({subject, src, rephrase, alt, loc, loc_ans}, plus `rephrases`, `relation` and
`synthetic`), so `memoir apply --file`, `memoir eval --data` and `memoir.evaluate` read them.

Promises (tests/test_synthetic.py): the same seed gives the same stream; the split's valid records
come first, unchanged and in order; every synthetic record has a subject of its own, and each of
its prompts (edited or rephrased) differs from every other prompt of the stream, the split's included.

    python -m memoir.synthetic --count 10000 --seed 0 > stream.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

SPLIT_FILE = Path(__file__).resolve().parent / "data" / "zsre_dev.jsonl"
REQUIRED = ("src", "alt", "rephrase", "loc", "loc_ans")

# ------------------------------------------------------------------------------- names

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "dr", "gr", "kr", "pr", "sh", "st", "th", "tr", "v", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ia"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "k"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, low: int = 2, high: int = 3) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(low, high))).capitalize()


def person(rng: random.Random) -> str:
    return f"{_word(rng, 2, 2)} {_word(rng, 2, 2)}"


def place(rng: random.Random) -> str:
    return _word(rng, 2, 2) + rng.choice(["", "", "", "burg", "ford", "ia", "ton", "stad"])


def company(rng: random.Random) -> str:
    return _word(rng, 2, 2) + " " + rng.choice(["Labs", "Systems", "Group", "Motors", "Foods", "Industries",
                                                "Records", "Media", "Holdings", "Works"])


def species(rng: random.Random) -> str:
    return f"{_word(rng, 2, 2)} {_word(rng, 1, 2).lower()}{rng.choice(['a', 'us', 'is', 'um'])}"


def family(rng: random.Random) -> str:
    return _word(rng, 1, 2) + "idae"


def title(rng: random.Random) -> str:
    return "The " + rng.choice(["Silent", "Last", "Hidden", "Iron", "Golden", "Broken", "Distant", "Red",
                                "Winter", "Endless", "Paper", "Glass"]) + " " + _word(rng, 2, 2)


def band(rng: random.Random) -> str:
    return rng.choice(["The ", "", ""]) + _word(rng, 2, 2) + rng.choice(["", "s", " Kids", " Union", " Machine"])


def university(rng: random.Random) -> str:
    return f"University of {place(rng)}"


def _choice(values: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(values)


OCCUPATIONS = ["architect", "botanist", "cartographer", "chemist", "diplomat", "economist", "engineer",
               "geologist", "historian", "journalist", "linguist", "mathematician", "painter", "pilot",
               "poet", "sculptor", "surgeon", "violinist", "astronomer", "photographer"]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Dutch", "Swedish", "Polish", "Portuguese",
             "Greek", "Turkish", "Finnish", "Czech", "Hungarian", "Danish", "Romanian", "Norwegian"]
POSITIONS = ["goalkeeper", "defender", "midfielder", "striker", "winger", "forward", "centre-back",
             "full-back", "sweeper", "playmaker"]
GENRES = ["jazz", "folk rock", "synth-pop", "blues", "heavy metal", "reggae", "punk rock", "soul",
          "techno", "bluegrass", "shoegaze", "hip hop"]

# --------------------------------------------------------------------------- relations


class Relation:
    """One relation: how to draw a subject and an answer, and its phrasings ({} = the subject)."""

    def __init__(self, name: str, subject: Callable[[random.Random], str], answer: Callable[[random.Random], str],
                 phrasings: Sequence[str]) -> None:
        if not 2 <= len(phrasings) <= 3:
            raise ValueError("a relation has 2 or 3 phrasings")
        self.name, self.subject, self.answer, self.phrasings = name, subject, answer, tuple(phrasings)


RELATIONS: tuple[Relation, ...] = (
    Relation("birthplace", person, place, ["Where was {} born?", "In which city was {} born?",
                                           "What is the birthplace of {}?"]),
    Relation("employer", person, company, ["Which company does {} work for?", "Who is {}'s employer?",
                                           "{} is employed by which company?"]),
    Relation("ceo", company, person, ["Who is the chief executive of {}?", "Who runs {} as its CEO?",
                                      "Who leads {}?"]),
    Relation("headquarters", company, place, ["Where is {} headquartered?", "In which city is {} based?"]),
    Relation("country", place, place, ["Which country is {} in?", "In what country is {} located?",
                                       "{} lies in which country?"]),
    Relation("family", species, family, ["Which family does {} belong to?", "What family is {} part of?"]),
    Relation("author", title, person, ["Who wrote {}?", "Who is the author of {}?", "{} was written by whom?"]),
    Relation("university", person, university, ["What university did {} attend?",
                                                "Where did {} go to university?",
                                                "Which university did {} graduate from?"]),
    Relation("occupation", person, _choice(OCCUPATIONS), ["What is {}'s occupation?",
                                                          "What does {} do for a living?",
                                                          "What job does {} have?"]),
    Relation("language", person, _choice(LANGUAGES), ["What language does {} speak?",
                                                      "Which language is {}'s native tongue?"]),
    Relation("position", person, _choice(POSITIONS), ["What position does {} play in football?",
                                                      "What is {}'s position on the pitch?",
                                                      "Which position does {} play?"]),
    Relation("genre", band, _choice(GENRES), ["What genre of music does {} play?",
                                              "What kind of music is {} known for?"]),
)

# ------------------------------------------------------------------------------ stream


def split_records(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The split's valid records (every REQUIRED field non-empty text), in file order."""
    with open(path or SPLIT_FILE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if _valid(r)]


def _valid(record: Any) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k].strip() for k in REQUIRED)


def stream(count: int | None = None, seed: int = 0, split: Sequence[dict[str, Any]] | None = None,
           include_split: bool = True) -> Iterator[dict[str, Any]]:
    """The first `count` records of the stream (endless when None): the split's valid records
    (`split`, default the shipped dev split), then synthetic ones drawn with `seed`.

    With `include_split` False only synthetic records come (still distinct from the split's
    prompts and subjects): e.g. unedited look-alike facts to test retrieval on."""
    split = list(split) if split is not None else split_records()
    for i, record in enumerate(split):
        if not _valid(record):
            raise ValueError(f"split record {i} is not a zsRE record (non-empty text in each of {REQUIRED})")
    rng = random.Random(f"memoir-synthetic-{seed}")
    prompts = {p for r in split for p in (r["src"], r["rephrase"], *r.get("rephrases", []))}
    subjects = {r.get("subject") for r in split}
    locs = [(r["loc"], r["loc_ans"]) for r in split]
    if not locs:
        raise ValueError("the split is empty: no locality questions to draw")
    produced = 0
    if include_split:
        for record in split:
            if count is not None and produced >= count:
                return
            yield dict(record)
            produced += 1
    while count is None or produced < count:
        relation = rng.choice(RELATIONS)
        subject = relation.subject(rng)
        answer = relation.answer(rng)
        order = list(relation.phrasings)
        rng.shuffle(order)
        texts = [p.replace("{}", subject) for p in order]  # the phrasing with its subject in
        texts = [t[0].upper() + t[1:] for t in texts]
        loc, loc_ans = rng.choice(locs)
        if subject in subjects or any(t in prompts for t in texts) or answer == subject:
            continue  # drawn again: every synthetic subject and every prompt is new
        subjects.add(subject)
        prompts.update(texts)
        yield {"subject": subject, "src": texts[0], "rephrase": texts[1], "rephrases": texts[1:], "alt": answer,
               "loc": loc, "loc_ans": loc_ans, "relation": relation.name, "synthetic": True}
        produced += 1


def records(count: int, seed: int = 0, split: Sequence[dict[str, Any]] | None = None,
            include_split: bool = True) -> list[dict[str, Any]]:
    """`stream` as a list."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return list(stream(count, seed, split, include_split))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a stream of zsRE-shaped edit records as JSON Lines.")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-split", action="store_true", help="synthetic records only")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    for record in stream(args.count, args.seed, include_split=not args.no_split):
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()


__all__ = ["RELATIONS", "Relation", "records", "split_records", "stream"]
