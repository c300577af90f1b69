"""Property tests and a fuzz pass over the request schema and the two JSONL readers (the
producer's `read_edit_file` and `memoir apply`'s `read_requests`): whatever comes in, the only
way out is an accepted request that keeps every invariant or a typed, named refusal.

Extends tests/test_pipeline_schema.py (hand-picked cases) with generated ones; no Redis, no torch.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from pipeline.schema import (
    DEFAULT_MAX_CHARS,
    MAX_METADATA_BYTES,
    MAX_REPHRASES,
    NAME_PATTERN,
    REQUEST_ID_PATTERN,
    EditRequest,
    RequestError,
    check_bounds,
    read_edit_file,
    record_to_request,
    validate_edit,
    validate_rollback,
)
from workers.model_commands import read_requests

FUZZ = hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALLOWED_CONTROLS = "\t\n\r"

# JSON as it arrives: any nesting of null, booleans, numbers (NaN and infinities included, as
# Python's json accepts them), strings with any code point (lone surrogates included), lists, objects.
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(st.characters(), max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Texts meant to hit the edges: blanks, control characters, NUL, surrogates, huge, template strings.
nasty_str = st.one_of(
    st.text(st.characters(), max_size=50),
    st.sampled_from(["", " ", "\t\n", "\u3000", "\x00", "a\x00b", "a\x1bb", "\x07", "\x7f", "\x85", "\ud800",
                     "caf\udce9", "{0.__class__}", "%(x)s", "${HOME}", "{{7*7}}", "__import__('os')"]),
    st.integers(1, 3).map(lambda n: "x" * (DEFAULT_MAX_CHARS + n)),
)


def request_dicts(text: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"prompt": text, "target": text},
        optional={"rephrases": st.lists(text, max_size=MAX_REPHRASES + 2) | json_values,
                  "request_id": st.text(max_size=140) | json_values,
                  "metadata": json_values, "name": st.text(max_size=70) | json_values},
    )


requests_dicts = request_dicts(nasty_str | st.binary(max_size=20))  # bytes: what a Python producer may pass


def is_clean_text(value: Any) -> bool:
    """What an accepted text field must be."""
    if not isinstance(value, str) or not value.strip() or len(value) > DEFAULT_MAX_CHARS:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS for c in value)


def check_accepted(request: EditRequest) -> None:
    """The invariants of any request the schema lets through."""
    assert all(is_clean_text(t) for t in (request.prompt, request.target, *request.rephrases))
    assert len(request.rephrases) <= MAX_REPHRASES
    assert REQUEST_ID_PATTERN.fullmatch(request.request_id) and NAME_PATTERN.fullmatch(request.name)
    text = json.dumps(request.metadata, allow_nan=False)  # plain JSON: no NaN, no odd types
    assert len(text.encode()) <= MAX_METADATA_BYTES + 2 * len(text)  # (ensure_ascii inflates; the limit is on UTF-8)
    again = validate_edit(json.loads(json.dumps(request.to_message())))
    assert again == request


# ------------------------------------------------------------------------------ the schema


@FUZZ
@given(data=requests_dicts)
@example(data={"prompt": "Who?", "target": "a\x1b[31mred"})
@example(data={"prompt": "Who?", "target": "x", "metadata": {"n": math.nan}})
@example(data={"prompt": "Who?", "target": "x", "rephrases": ["r"] * (MAX_REPHRASES + 1)})
def test_a_request_is_either_clean_or_refused_naming_a_field(data):
    try:
        request = validate_edit(data)
    except RequestError as exc:
        assert exc.field and exc.message and str(exc).startswith(exc.field)
        return
    check_accepted(request)


@FUZZ
@given(data=json_values)
def test_any_json_value_as_a_request_is_refused_or_clean(data):
    try:
        check_accepted(validate_edit(data))
    except RequestError as exc:
        assert exc.field


@FUZZ
@given(data=json_values)
def test_any_json_value_as_a_file_record_is_refused_or_clean(data):
    try:
        check_accepted(validate_edit(record_to_request(data)))
    except RequestError as exc:
        assert exc.field


@pytest.mark.parametrize("control", ["\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x9b"])
def test_control_characters_are_refused_with_their_code_point(control):
    with pytest.raises(RequestError) as info:
        validate_edit({"prompt": f"Who{control}?", "target": "x"})
    assert info.value.field == "prompt" and f"U+{ord(control):04X}" in info.value.message
    assert validate_edit({"prompt": "Line one\n\tline two\r\n", "target": "x"}).prompt.startswith("Line one")


@FUZZ
@given(data=requests_dicts)
def test_the_workers_bounds_check_agrees_with_the_schema(data):
    """What a worker re-checks on a message from its queue (`check_bounds`) refuses nothing the
    schema accepts, and refuses every over-long or control-laden text the schema refuses."""
    try:
        validate_edit(data)
        accepted = True
    except RequestError:
        accepted = False
    try:
        check_bounds(data)
        bounded = True
    except RequestError as exc:
        bounded = False
        assert exc.field
    if accepted:
        assert bounded
    texts = [data.get("prompt"), data.get("target")]
    if isinstance(data.get("rephrases"), list):
        texts += data["rephrases"]
    too_long = any(isinstance(t, str) and len(t) > DEFAULT_MAX_CHARS for t in texts)
    control = any(isinstance(t, str) and any(unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS for c in t)
                  for t in texts)
    if too_long or control:
        assert not bounded


@FUZZ
@given(edit=json_values, reason=json_values, exact=json_values, name=json_values)
def test_a_rollback_request_is_either_clean_or_refused(edit, reason, exact, name):
    try:
        request = validate_rollback(edit, reason=reason, exact=exact, name=name)
    except RequestError as exc:
        assert exc.field in {"edit", "reason", "exact", "name", "request_id"}
        return
    assert isinstance(request.edit, (int, str)) and not isinstance(request.edit, bool)
    assert isinstance(request.exact, bool) and NAME_PATTERN.fullmatch(request.name)
    assert request.reason is None or is_clean_text(request.reason)


# ------------------------------------------------------------------------------ the readers


def lines_of(records: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


file_bytes = st.one_of(
    st.binary(max_size=300),  # anything at all, invalid UTF-8 included
    st.lists(json_values, max_size=5).map(lines_of),
    st.lists(request_dicts(nasty_str), max_size=5).map(lines_of),
)


@FUZZ
@given(content=file_bytes)
@example(content=b'{"prompt": "q", "target": "a"}\n\xff\xfe\n')
@example(content=b'{"prompt": "q", "target": "a", "rephrases": 5}\n')
@example(content=b'{"prompt": "q", "target": NaN}\n')
def test_the_producer_reader_names_the_bad_line_or_returns_clean_requests(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "edits.jsonl"
    path.write_bytes(content)
    try:
        requests = list(read_edit_file(path))
    except RequestError as exc:
        assert exc.field.startswith("line ")
        return
    for request in requests:
        check_accepted(request)


@FUZZ
@given(content=file_bytes)
def test_the_apply_reader_reports_bad_lines_and_returns_usable_requests(tmp_path_factory, content):
    """`memoir apply` skips (and reports) what is not a request; what it keeps has text fields."""
    path = tmp_path_factory.mktemp("fuzz") / "edits.jsonl"
    path.write_bytes(content)
    requests, problems = read_requests(path)
    for problem in problems:
        assert problem.startswith("line ")
    for request in requests:
        assert isinstance(request["prompt"], str) and request["prompt"].strip()
        assert isinstance(request["target"], str) and request["target"].strip()
        assert set(request) <= {"prompt", "target", "rephrases", "metadata", "request_id", "name", "replaces"}
    # one reader: `memoir apply` keeps exactly the lines `memoir submit --file` accepts
    try:
        accepted = list(read_edit_file(path, name="default"))
    except RequestError as exc:
        assert str(exc) in problems  # the line submit refuses first, apply skips
        return
    elsewhere = [a for a in accepted if a.name != "default"]  # apply writes one memory: lines naming another are skipped
    assert len(problems) == len(elsewhere) and all(": name: is " in p for p in problems)
    assert [(r["prompt"], r["target"], r["rephrases"], r["metadata"]) for r in requests] == \
        [(a.prompt, a.target, list(a.rephrases), a.metadata) for a in accepted if a.name == "default"]


def test_apply_and_submit_read_the_same_lines_the_same_way(tmp_path):
    """The lines where the two readers used to part: `memoir apply` took control characters,
    a rephrase given as one string, a numeric id, a blank rephrase, and read nothing after
    a line of invalid UTF-8."""
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b'{"prompt": "q1?", "target": "a\\u001b[31m"}\n'
                     b'{"prompt": "q2?", "target": "a", "rephrases": "one"}\n'
                     b'{"prompt": "q3?", "target": "a", "id": 17}\n'
                     b'{"prompt": "q4?", "target": "a", "rephrases": [" "]}\n'
                     b'{"prompt": "q5\xff?", "target": "a"}\n'
                     b'{"src": "q6?", "alt": "a6", "rephrase": "r6", "subject": "s6", "loc": "l", "loc_ans": "la"}\n')
    requests, problems = read_requests(path)
    assert [p.split(":")[0] for p in problems] == ["line 1", "line 2", "line 3", "line 4", "line 5"]
    assert [r["prompt"] for r in requests] == ["q6?"] and requests[0]["rephrases"] == ["r6"]
    with pytest.raises(RequestError) as info:
        list(read_edit_file(path))
    assert str(info.value) == problems[0]
    last = tmp_path / "last.jsonl"
    last.write_bytes(path.read_bytes().splitlines()[-1])
    assert requests[0]["metadata"] == {"subject": "s6"} == list(read_edit_file(last))[0].metadata
    assert requests[0]["request_id"].startswith("apply-")  # an id from the content: a second apply skips it
    assert read_requests(path)[0][0]["request_id"] == requests[0]["request_id"]


def test_a_huge_file_is_refused_at_its_bad_line_without_reading_on(tmp_path):
    """A 40 MB file: a valid first line, then one enormous line. The reader stops at line 2 with
    the limit in its message, in well under the time it would take to send anything."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(lines_of([{"prompt": "q?", "target": "a"}]))
        f.write(b'{"prompt": "' + b"x" * (40 << 20) + b'", "target": "a"}\n')
        f.write(lines_of([{"prompt": "never", "target": "read"}]))
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        list(read_edit_file(path))
    assert info.value.field == "line 2: prompt" and "limit" in info.value.message
    assert time.perf_counter() - started < 30


def test_a_file_of_many_valid_lines_is_read_whole(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(lines_of([{"prompt": f"Question {n}?", "target": f"answer {n}", "id": f"m-{n}"}
                               for n in range(20_000)]))
    requests = list(read_edit_file(path))
    assert len(requests) == 20_000 and requests[-1].request_id == "m-19999"

