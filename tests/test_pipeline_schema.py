"""The request schema and the shared Celery settings: pure functions, no Redis, no torch."""

from __future__ import annotations

import json
import ssl

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from pipeline import settings
from pipeline.schema import (
    EditRequest,
    RequestError,
    check_unique_ids,
    read_edit_file,
    record_to_request,
    validate_edit,
    validate_rollback,
)


def refused_field(data: dict, **kwargs) -> str:
    with pytest.raises(RequestError) as info:
        validate_edit(data, **kwargs)
    return info.value.field


# ------------------------------------------------------------------------------ edit requests


def test_a_valid_request_gets_an_id_and_the_default_memory():
    request = validate_edit({"prompt": "Who wrote Hamlet?", "target": "Marlowe", "rephrases": ["Hamlet's author?"]})
    assert isinstance(request, EditRequest)
    assert request.name == "default" and request.rephrases == ("Hamlet's author?",)
    assert len(request.request_id) == 36  # a uuid4
    assert validate_edit({"prompt": "a", "target": "b"}).request_id != request.request_id
    assert request.to_message() == {"request_id": request.request_id, "prompt": "Who wrote Hamlet?",
                                    "target": "Marlowe", "rephrases": ["Hamlet's author?"], "metadata": {},
                                    "name": "default"}


@pytest.mark.parametrize("data, field", [
    ({"prompt": "", "target": "x"}, "prompt"),
    ({"prompt": " \t\n", "target": "x"}, "prompt"),
    ({"prompt": "q", "target": "   "}, "target"),
    ({"target": "x"}, "prompt"),
    ({"prompt": 5, "target": "x"}, "prompt"),
    ({"prompt": "q", "target": ["x"]}, "target"),
    ({"prompt": "q", "target": "x", "rephrases": "one"}, "rephrases"),
    ({"prompt": "q", "target": "x", "rephrases": ["ok", 3]}, "rephrases[1]"),
    ({"prompt": "q", "target": "x", "rephrases": ["ok", " "]}, "rephrases[1]"),
    ({"prompt": "q", "target": "x", "metadata": ["a"]}, "metadata"),
    ({"prompt": "q", "target": "x", "metadata": {"a": {1, 2}}}, "metadata"),
    ({"prompt": "q", "target": "x", "metadata": {"a": float("nan")}}, "metadata"),
    ({"prompt": "q", "target": "x", "request_id": 17}, "request_id"),
    ({"prompt": "q", "target": "x", "request_id": "has space"}, "request_id"),
    ({"prompt": "q", "target": "x", "request_id": ""}, "request_id"),
    ({"prompt": "q", "target": "x", "name": "a/b"}, "name"),
    ({"prompt": "q", "target": "x", "name": ""}, "name"),
    ({"prompt": "q", "target": "x", "tagret": "y"}, "tagret"),
    ({"prompt": "q\x00", "target": "x"}, "prompt"),
])
def test_bad_fields_are_refused_naming_the_field(data, field):
    assert refused_field(data) == field


def test_invalid_utf8_is_refused_and_valid_bytes_are_decoded():
    assert refused_field({"prompt": b"caf\xe9", "target": "x"}) == "prompt"
    assert refused_field({"prompt": "q", "target": "caf\udce9"}) == "target"  # surrogateescape'd argv bytes
    assert validate_edit({"prompt": "café".encode(), "target": "x"}).prompt == "café"


def test_the_length_limit_is_configurable(monkeypatch):
    assert refused_field({"prompt": "q" * 11, "target": "x"}, max_chars=10) == "prompt"
    assert validate_edit({"prompt": "q" * 10, "target": "x"}, max_chars=10).prompt == "q" * 10
    monkeypatch.setenv("MEMOIR_MAX_CHARS", "5")
    assert refused_field({"prompt": "q", "target": "abcdef"}) == "target"
    monkeypatch.setenv("MEMOIR_MAX_CHARS", "lots")
    assert refused_field({"prompt": "q", "target": "x"}) == "MEMOIR_MAX_CHARS"


def test_the_payload_hash_ignores_the_id_only():
    a = validate_edit({"prompt": "q", "target": "x", "request_id": "a"})
    b = validate_edit({"prompt": "q", "target": "x", "request_id": "b"})
    assert a.payload_hash() == b.payload_hash()
    for change in ({"target": "y"}, {"rephrases": ["r"]}, {"metadata": {"k": 1}}, {"name": "other"}):
        c = validate_edit({"prompt": "q", "target": "x", "request_id": "a", **change})
        assert c.payload_hash() != a.payload_hash(), change
    check_unique_ids([a, b, a])
    with pytest.raises(RequestError):
        check_unique_ids([a, validate_edit({"prompt": "q", "target": "y", "request_id": "a"})])


text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)  # control characters are refused


@hsettings(max_examples=200, deadline=None)
@given(prompt=text, target=text, rephrases=st.lists(text, max_size=3),
       metadata=st.dictionaries(st.text(max_size=5), st.integers() | text, max_size=3))
def test_any_valid_request_survives_a_json_round_trip(prompt, target, rephrases, metadata):
    data = {"prompt": prompt, "target": target, "rephrases": rephrases, "metadata": metadata}
    if not prompt.strip() or not target.strip() or not all(r.strip() for r in rephrases):
        with pytest.raises(RequestError):
            validate_edit(data)
        return
    request = validate_edit(data)
    again = validate_edit(json.loads(json.dumps(request.to_message())))
    assert again == request and again.payload_hash() == request.payload_hash()


# ---------------------------------------------------------------------------------- edit files


def test_zsre_records_and_request_lines_map_to_requests():
    zsre = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
            "alt": "University of Michigan", "rephrase": "Where did he study?", "loc": "nq question: x",
            "loc_ans": "y", "pred": "p", "answers": ["a"]}
    assert record_to_request(zsre) == {"prompt": zsre["src"], "target": "University of Michigan",
                                       "rephrases": ["Where did he study?"],
                                       "metadata": {"subject": "Watts Humphrey"}}
    line = {"prompt": "q", "target": "t", "rephrase": "r", "id": "x1", "name": "m"}
    assert record_to_request(line) == {"prompt": "q", "target": "t", "rephrases": ["r"], "request_id": "x1",
                                       "name": "m"}


def test_edit_files_name_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"src": "q1?", "alt": "a1", "rephrase": "r1"}\n\n{"prompt": "q2?", "target": "a2"}\n')
    requests = list(read_edit_file(good, name="mem"))
    assert [(r.prompt, r.target, r.name) for r in requests] == [("q1?", "a1", "mem"), ("q2?", "a2", "mem")]
    cases = {
        b'{"prompt": "q", "target": "a"}\n{"prompt": "q", "target": ""}\n': "line 2: target",
        b'{"prompt": "q", "target": "a"}\nnot json\n': "line 2",
        b'{"prompt": "q\xff", "target": "a"}\n': "line 1",
        b'["prompt"]\n': "line 1: record",
        b'{"prompt": "q", "target": 4}\n': "line 1: target",
    }
    for content, field in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(content)
        with pytest.raises(RequestError) as info:
            list(read_edit_file(bad))
        assert info.value.field == field, content


def test_the_shipped_zsre_file_has_exactly_its_two_empty_targets_refused():
    from pathlib import Path

    import pipeline

    path = Path(pipeline.__file__).parent.parent / "memoir" / "data" / "zsre_dev.jsonl"
    refused = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            validate_edit(record_to_request(json.loads(line)))
        except RequestError as exc:
            refused.append((number, exc.field))
    assert len(refused) == 2 and {f for _, f in refused} == {"target"}


def test_rollback_requests_are_checked():
    request = validate_rollback(7, reason="outdated")
    assert request.to_message()["edit"] == 7 and request.exact is False
    assert validate_rollback("req-1", exact=True).edit == "req-1"
    for bad, field in ((0, "edit"), (True, "edit"), (1.5, "edit"), ("a b", "edit")):
        with pytest.raises(RequestError) as info:
            validate_rollback(bad)
        assert info.value.field == field
    with pytest.raises(RequestError):
        validate_rollback(3, reason=" ")
    with pytest.raises(RequestError):
        validate_rollback(3, exact="yes")


# ------------------------------------------------------------------------------------ settings


def test_the_celery_settings_are_json_only_late_acks_prefetch_one(monkeypatch):
    monkeypatch.setenv("MEMOIR_VISIBILITY_TIMEOUT", "1200")
    config = settings.celery_config("redis://127.0.0.1:6379/3")
    assert config["accept_content"] == ["json"] and config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["task_acks_late"] is True and config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_concurrency"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] == 1200
    app = settings.make_app("redis://127.0.0.1:6379/3")
    assert app.conf.accept_content == ["json"] and app.conf.task_acks_late
    assert settings.queue_name("gpu0-llama") == "memoir.gpu0-llama"
    with pytest.raises(RequestError):
        settings.queue_name("a.b")


def test_a_malformed_visibility_timeout_is_refused(monkeypatch):
    monkeypatch.delenv("MEMOIR_VISIBILITY_TIMEOUT", raising=False)
    assert settings.visibility_timeout() == settings.DEFAULT_VISIBILITY_TIMEOUT
    for value in ("ten", "3"):
        monkeypatch.setenv("MEMOIR_VISIBILITY_TIMEOUT", value)
        with pytest.raises(settings.SettingsError):
            settings.visibility_timeout()


def test_the_redis_url_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MEMOIR_REDIS_URL", raising=False)
    assert settings.redis_url() == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("MEMOIR_REDIS_URL", "redis://:pw@cache:6380/2")
    assert settings.redis_url() == "redis://:pw@cache:6380/2"


def test_passwords_are_redacted():
    assert settings.redact("redis://:s3cret@host:6380/1") == "redis://:***@host:6380/1"
    assert settings.redact("rediss://user:s3cret@host/0") == "rediss://user:***@host/0"
    assert settings.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_tls_urls_verify_certificates_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("MEMOIR_REDIS_CA", "/etc/ssl/ca.pem")
    config = settings.celery_config("rediss://:pw@host:6380/0")
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ssl/ca.pem"}
    assert "broker_use_ssl" not in settings.celery_config("rediss://:pw@host:6380/0?ssl_cert_reqs=none")
    assert "broker_use_ssl" not in settings.celery_config("redis://host:6379/0")
    connection = settings.make_app("rediss://:pw@host:6380/0").connection_for_write()
    assert connection.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert "pw" not in connection.as_uri()


# ----------------------------------------------------------------- the pydantic model, its schema


def test_the_request_is_a_pydantic_model_with_the_same_refusals():
    from pydantic import BaseModel, ValidationError

    assert issubclass(EditRequest, BaseModel)
    request = EditRequest.model_validate({"prompt": "q", "target": "x", "rephrases": ["r"], "replaces": 4})
    assert request.rephrases == ("r",) and request.replaces == 4 and request.name == "default"
    with pytest.raises(ValidationError) as info:
        EditRequest.model_validate({"prompt": "q", "target": "x", "rephrases": ["ok", " "]})
    original = info.value.errors()[0]["ctx"]["error"]
    assert isinstance(original, RequestError) and original.field == "rephrases[1]"
    with pytest.raises(ValidationError):
        EditRequest.model_validate({"prompt": "q", "target": "x", "tagret": "y"})
    with pytest.raises(Exception):  # frozen: a validated request cannot be changed afterwards
        request.target = "y"  # type: ignore[misc]
    # the same checks through the constructor
    with pytest.raises(ValidationError):
        EditRequest(prompt="q", target="x", name="a/b")


def test_the_json_schema_states_the_limits_in_force():
    import jsonschema

    from pipeline.schema import MAX_REPHRASES, edit_request_json_schema

    schema = edit_request_json_schema(max_chars=50)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["prompt", "target"] and schema["additionalProperties"] is False
    assert schema["properties"]["prompt"]["maxLength"] == 50
    assert schema["properties"]["rephrases"]["maxItems"] == MAX_REPHRASES
    check = jsonschema.Draft202012Validator(schema)
    accepted = {"prompt": "q", "target": "x", "rephrases": ["r"], "request_id": "crm-1", "name": "llama3",
                "metadata": {"k": [1]}, "replaces": "same-prompt"}
    assert check.is_valid(accepted) and validate_edit(accepted, max_chars=50)
    refused = [{"prompt": "q"}, {"prompt": "q", "target": "x", "tagret": "y"},
               {"prompt": "q" * 51, "target": "x"}, {"prompt": "q", "target": "x", "name": "a/b"},
               {"prompt": "q", "target": "x", "request_id": "has space"},
               {"prompt": "q", "target": "x", "rephrases": ["r"] * (MAX_REPHRASES + 1)},
               {"prompt": "q", "target": "x", "replaces": 0}, {"prompt": "q", "target": "x", "metadata": []}]
    for data in refused:  # what the schema refuses, validate_edit refuses too
        assert not check.is_valid(data), data
        with pytest.raises(RequestError):
            validate_edit(data, max_chars=50)
