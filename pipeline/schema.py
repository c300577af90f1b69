"""The edit request: what a producer may submit, checked before anything is sent.

A request is plain JSON: `prompt`, `target`, optional `rephrases`, `request_id` (generated when
absent; the idempotency key and the Celery task id), `metadata` (a JSON object kept in the
ledger), `name` (the target memory, default `default`) and `replaces` (the edit this one
supersedes; see `check_replaces`). Every refusal is a `RequestError` naming the offending
field. No torch here: producers are small services.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

DEFAULT_NAME = "default"
DEFAULT_MAX_CHARS = 2000  # per text field; MEMOIR_MAX_CHARS overrides
MAX_REPHRASES = 16
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 32  # nesting of lists and objects: deeper ones exhaust the stack of any JSON library
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# C0/C1 control characters but tab and line breaks: escape sequences would reach operators' terminals.
CONTROL_PATTERN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
FIELDS = ("prompt", "target", "rephrases", "request_id", "metadata", "name", "replaces")
SAME_PROMPT = "same-prompt"  # `replaces`: the live edit(s) of the memory with exactly this prompt
MAX_EDIT_ID = 2**63 - 1  # ledger ids are 64-bit integers
REPLAY_MODES = ("retrain", "sum")


class RequestError(ValueError):
    """A request was refused before it was sent. `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def max_chars_default() -> int:
    """The per-field text limit: `MEMOIR_MAX_CHARS`, else 2000 characters."""
    raw = os.environ.get("MEMOIR_MAX_CHARS", "")
    try:
        value = int(raw) if raw.strip() else DEFAULT_MAX_CHARS
    except ValueError:
        raise RequestError("MEMOIR_MAX_CHARS", f"must be a whole number, got {raw!r}") from None
    if value < 1:
        raise RequestError("MEMOIR_MAX_CHARS", f"must be >= 1, got {value}")
    return value


def check_name(name: object, field_name: str = "name") -> str:
    """A memory name: 1-64 of letters, digits, `_` and `-` (it becomes the queue `memoir.<name>`)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RequestError(field_name, f"must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return name


def check_request_id(value: object, field_name: str = "request_id") -> str:
    """A request id: 1-128 of letters, digits and `_ . : -` (safe as a Redis key and task id)."""
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.fullmatch(value):
        raise RequestError(field_name, f"must be 1-128 letters, digits or '_.:-', got {value!r}")
    return value


def check_text(field_name: str, value: object, max_chars: int) -> str:
    """Text that is valid UTF-8, not blank, without NUL or other control characters (tab and line
    breaks are fine) and at most `max_chars` long."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(field_name, f"is not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(value, str):
        raise RequestError(field_name, f"must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")  # lone surrogates: undecodable bytes smuggled in through argv or JSON
    except UnicodeEncodeError as exc:
        raise RequestError(field_name, f"is not valid UTF-8 (character {exc.start})") from None
    if not value.strip():
        raise RequestError(field_name, "is empty")
    if "\x00" in value:
        raise RequestError(field_name, "contains a NUL character")
    _check_length_and_controls(field_name, value, max_chars)
    return value


def _check_length_and_controls(field_name: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise RequestError(field_name, f"is {len(value)} characters long; the limit is {max_chars}")
    control = CONTROL_PATTERN.search(value)
    if control:
        raise RequestError(field_name, f"contains the control character U+{ord(control.group()):04X} "
                                       f"at position {control.start()}")


def check_bounds(data: Mapping[str, Any], *, max_chars: int | None = None) -> None:
    """What a worker checks again on a message from its queue before recording it (whoever can
    write to Redis can bypass the client): texts within the limit and free of control
    characters, at most MAX_REPHRASES rephrases, metadata within MAX_METADATA_BYTES. Wrong types
    and blank texts are left to the ledger, which records them as `failed`. Raises RequestError."""
    limit = max_chars if max_chars is not None else max_chars_default()
    rephrases = data.get("rephrases")
    texts = [("prompt", data.get("prompt")), ("target", data.get("target"))]
    if isinstance(rephrases, (list, tuple)):
        if len(rephrases) > MAX_REPHRASES:
            raise RequestError("rephrases", f"has {len(rephrases)} entries; the limit is {MAX_REPHRASES}")
        texts += [(f"rephrases[{i}]", r) for i, r in enumerate(rephrases)]
    for field_name, value in texts:
        if isinstance(value, str):
            _check_length_and_controls(field_name, value, limit)
    metadata = data.get("metadata")
    if isinstance(metadata, Mapping):
        _check_metadata_depth(metadata)
        try:
            size = len(json.dumps(metadata, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError):
            return  # not JSON: the ledger refuses it
        if size > MAX_METADATA_BYTES:
            raise RequestError("metadata", f"is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")


def json_depth(value: Any, limit: int) -> int:
    """How deeply lists and objects nest in `value`, iteratively (no recursion); it stops
    looking past `limit` levels (and returns limit + 1), so a cycle ends too."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            item = list(item.values())
        elif not isinstance(item, (list, tuple)):
            continue
        if level > limit:
            return level
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in item)
    return deepest


def _check_metadata_depth(metadata: object) -> None:
    if json_depth(metadata, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise RequestError("metadata", f"nests deeper than {MAX_METADATA_DEPTH} levels of lists and objects")


def check_replaces(value: object, field_name: str = "replaces") -> int | str | None:
    """What an edit supersedes: None (nothing), a ledger edit id (int >= 1), a request id (text),
    or "same-prompt" (SAME_PROMPT: the live edits with exactly the same prompt). The worker
    applies the new edit and rolls the replaced one back in the same queued operation; it
    refuses the request (nothing changes) when that names no live edit of the memory."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(field_name, f"must be an edit id, a request id or {SAME_PROMPT!r}, "
                                       f"got {type(value).__name__}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_EDIT_ID:
            raise RequestError(field_name, f"must be an edit id >= 1, got {value}")
        return value
    return value if value == SAME_PROMPT else check_request_id(value, field_name)


def _check_metadata(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RequestError("metadata", f"must be a JSON object, got {type(value).__name__}")
    _check_metadata_depth(value)
    try:
        text = json.dumps(dict(value), sort_keys=True, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise RequestError("metadata", f"must be plain JSON with text keys ({exc})") from None
    if size > MAX_METADATA_BYTES:
        raise RequestError("metadata", f"is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return json.loads(text)


def _payload_hash(message: Mapping[str, Any]) -> str:
    body = {k: v for k, v in message.items() if k != "request_id"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EditRequest(BaseModel):
    """One validated edit request (a pydantic model: `edit_request_json_schema()` is its JSON
    Schema). Build it with `validate_edit(data)`, which raises `RequestError` naming the field;
    `EditRequest.model_validate(data)` applies the same rules but raises pydantic's
    `ValidationError` (each error's `ctx["error"]` is the `RequestError`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="memoir edit request")

    prompt: str = Field(description="The prompt whose answer the edit changes.")
    target: str = Field(description="The answer the edited model should give.")
    rephrases: tuple[str, ...] = Field((), description="Paraphrases of the prompt, trained and scored with it.")
    request_id: str = Field(default_factory=lambda: new_request_id(),
                            description="The idempotency key (and Celery task id); a uuid4 when absent.")
    name: str = Field(DEFAULT_NAME, description="The memory edited (its queue is memoir.<name>).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Any JSON object, kept in the ledger.")
    replaces: int | str | None = Field(None, description=f"The edit this one supersedes: its ledger id, its "
                                                         f"request id, or {SAME_PROMPT!r}.")

    @model_validator(mode="before")
    @classmethod
    def _object_with_known_fields(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise RequestError("request", f"must be a JSON object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in FIELDS)
        if unknown:
            key = unknown[0]  # named as written when it looks like a field name, else quoted (blank, odd characters)
            key = key if re.fullmatch(r"\w{1,64}", key, re.ASCII) else repr(key[:64])
            raise RequestError(key, f"is not a request field (expected some of {', '.join(FIELDS)})")
        return data

    @field_validator("prompt", "target", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        return check_text(info.field_name, value, _max_chars(info))

    @field_validator("rephrases", mode="before")
    @classmethod
    def _rephrases(cls, value: Any, info: ValidationInfo) -> tuple[str, ...]:
        value = () if value is None else value
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise RequestError("rephrases", f"must be a list of texts, got {type(value).__name__}")
        if len(value) > MAX_REPHRASES:
            raise RequestError("rephrases", f"has {len(value)} entries; the limit is {MAX_REPHRASES}")
        limit = _max_chars(info)
        return tuple(check_text(f"rephrases[{i}]", r, limit) for i, r in enumerate(value))

    @field_validator("request_id", mode="before")
    @classmethod
    def _request_id(cls, value: Any) -> str:
        return new_request_id() if value is None else check_request_id(value)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        return DEFAULT_NAME if value is None else check_name(value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> dict[str, Any]:
        return _check_metadata(value)

    @field_validator("replaces", mode="before")
    @classmethod
    def _replaces(cls, value: Any) -> int | str | None:
        return check_replaces(value)

    def to_message(self) -> dict[str, Any]:
        """The JSON body the worker receives (and `runtime.apply_request` takes); `replaces`
        only when set."""
        message = {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "target": self.target,
            "rephrases": list(self.rephrases),
            "metadata": self.metadata,
            "name": self.name,
        }
        if self.replaces is not None:
            message["replaces"] = self.replaces
        return message

    def payload_hash(self) -> str:
        """sha256 of everything but the id: the same id with another payload is a conflict."""
        return _payload_hash(self.to_message())


def _max_chars(info: ValidationInfo) -> int:
    context = info.context or {}
    limit = context.get("max_chars")
    return limit if limit is not None else max_chars_default()


def new_request_id() -> str:
    return str(uuid.uuid4())


def _field_of(location: tuple[Any, ...]) -> str:
    """pydantic's error location as this module names fields: ("rephrases", 1) -> "rephrases[1]"."""
    if not location:
        return "request"
    text = str(location[0])
    for part in location[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def request_error(error: ValidationError) -> RequestError:
    """The first refusal of a pydantic `ValidationError` of `EditRequest` as a `RequestError`."""
    first = error.errors(include_url=False)[0]
    original = (first.get("ctx") or {}).get("error")
    if isinstance(original, RequestError):
        return original
    if first.get("type") == "missing":
        field_name = _field_of(first["loc"])
        if field_name in ("prompt", "target"):
            return RequestError(field_name, "must be text, got NoneType")  # as before: a missing text is no text
        return RequestError(field_name, "is missing")
    return RequestError(_field_of(first["loc"]), first.get("msg", "is invalid"))


def validate_edit(data: Mapping[str, Any], *, max_chars: int | None = None) -> EditRequest:
    """Check a request dict field by field and return it as an `EditRequest`.

    Unknown fields are refused (a typo must not silently drop a field). A missing
    `request_id` is generated; a missing `name` is `default`; `replaces` is `check_replaces`'s.
    Raises `RequestError` naming the first offending field.
    """
    if not isinstance(data, Mapping):
        raise RequestError("request", f"must be a JSON object, got {type(data).__name__}")
    limit = max_chars if max_chars is not None else max_chars_default()
    try:
        return EditRequest.model_validate(data, context={"max_chars": limit})
    except ValidationError as exc:
        raise request_error(exc) from None


def edit_request_json_schema(*, max_chars: int | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an edit request, with the limits in force (`max_chars`,
    default `MEMOIR_MAX_CHARS`): what the HTTP API and `memoir submit` accept. Checks that JSON
    Schema cannot say (blank texts, invalid UTF-8, control characters, metadata size and
    depth) are in the descriptions."""
    limit = max_chars if max_chars is not None else max_chars_default()
    schema = EditRequest.model_json_schema(mode="validation")
    props = schema["properties"]
    text = {"minLength": 1, "maxLength": limit}
    for key in ("prompt", "target"):
        props[key].update(text)
        props[key]["description"] += (" Not blank; no NUL or other control characters but tab and line breaks; "
                                      f"at most {limit} characters.")
    props["rephrases"]["items"].update(text)
    props["rephrases"]["maxItems"] = MAX_REPHRASES
    props["request_id"]["pattern"] = f"^{REQUEST_ID_PATTERN.pattern}$"
    props["name"]["pattern"] = f"^{NAME_PATTERN.pattern}$"
    props["metadata"]["description"] += (f" At most {MAX_METADATA_BYTES} bytes as JSON, nesting at most "
                                         f"{MAX_METADATA_DEPTH} levels.")
    for option in props["replaces"]["anyOf"]:
        if option.get("type") == "integer":
            option.update({"minimum": 1, "maximum": MAX_EDIT_ID})
        elif option.get("type") == "string":
            option["pattern"] = f"^{REQUEST_ID_PATTERN.pattern}$"
    return schema


def record_to_request(record: Mapping[str, Any]) -> dict[str, Any]:
    """One line of an edit file as a request dict (still to validate).

    zsRE records (`src`, `alt`, `rephrase`, `subject`, ...) map to prompt=src, target=alt,
    rephrases=[rephrase], metadata={"subject": ...} (and `replaces` when given); other lines are
    request dicts, where `id` may stand for `request_id` and a single `rephrase` for `rephrases`.
    """
    if not isinstance(record, Mapping):
        raise RequestError("record", f"must be a JSON object, got {type(record).__name__}")
    if "src" in record and "alt" in record:
        request: dict[str, Any] = {"prompt": record["src"], "target": record["alt"]}
        if record.get("rephrase"):
            request["rephrases"] = [record["rephrase"]]
        if record.get("subject") is not None:
            request["metadata"] = {"subject": record["subject"]}
        if record.get("replaces") is not None:
            request["replaces"] = record["replaces"]
        return request
    request = dict(record)
    if "id" in request:
        if "request_id" in request:
            raise RequestError("id", "given together with request_id")
        request["request_id"] = request.pop("id")
    if "rephrase" in request:
        if "rephrases" in request:
            raise RequestError("rephrase", "given together with rephrases")
        single = request.pop("rephrase")
        request["rephrases"] = [single] if single is not None else []
    return request


@dataclass(frozen=True)
class EditLine:
    """One non-blank line of an edit file: its number and either the request or why not."""

    number: int
    request: EditRequest | None = None
    error: RequestError | None = None


def scan_edit_file(path: str | os.PathLike, *, name: str | None = None, max_chars: int | None = None,
                   default_id: Callable[[EditRequest], str] | None = None) -> Iterator[EditLine]:
    """The one reader of edit files (`memoir submit --file`, `memoir apply`): each non-blank line
    of a JSONL file, mapped by `record_to_request` and checked by `validate_edit`, as an
    `EditLine` holding the request or the `RequestError` (its field names the line:
    `"line 7: prompt"`). `name` fills lines that name no memory; `default_id(request)` gives the
    id of a line without one (else a uuid4). Each line is decoded on its own, so one line of
    invalid UTF-8 spoils that line only."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise RequestError(where, f"is not valid UTF-8 (byte {exc.start})") from None
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise RequestError(where, f"is not JSON ({getattr(exc, 'msg', 'nested too deeply')})") from None
                try:
                    request = record_to_request(record)
                    if name is not None and request.get("name") is None:
                        request["name"] = name
                    given_id = request.get("request_id") is not None
                    checked = validate_edit(request, max_chars=max_chars)
                except RequestError as exc:
                    raise RequestError(f"{where}: {exc.field}", exc.message) from None
                if default_id is not None and not given_id:
                    checked = checked.model_copy(update={"request_id": default_id(checked)})
                yield EditLine(number, request=checked)
            except RequestError as exc:
                yield EditLine(number, error=exc)


def read_edit_file(path: str | os.PathLike, *, name: str | None = None,
                   max_chars: int | None = None) -> Iterator[EditRequest]:
    """Validated requests from a JSONL file, one per non-blank line; the first bad line raises
    (`RequestError("line 7: prompt", ...)`). `name` fills requests that give none. The whole
    file should be read (e.g. `list(...)`) before anything is sent."""
    for line in scan_edit_file(path, name=name, max_chars=max_chars):
        if line.error is not None:
            raise line.error
        yield line.request  # type: ignore[misc]


def check_unique_ids(requests: Iterable[EditRequest]) -> None:
    """Refuse a batch that gives one request id to two different payloads."""
    seen: dict[str, str] = {}
    for request in requests:
        digest = request.payload_hash()
        if seen.setdefault(request.request_id, digest) != digest:
            raise RequestError("request_id", f"{request.request_id!r} is given to two different edits")


@dataclass(frozen=True)
class RollbackRequest:
    """Take one edit out of a memory: `edit` is its ledger id (int) or its request id (str)."""

    edit: int | str
    request_id: str
    reason: str | None = None
    exact: bool = False
    name: str = DEFAULT_NAME

    def to_message(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "edit": self.edit, "reason": self.reason,
                "exact": self.exact, "name": self.name}

    def payload_hash(self) -> str:
        return _payload_hash(self.to_message())


def validate_rollback(edit: object, *, reason: object = None, exact: object = False,
                      name: object = DEFAULT_NAME, request_id: object = None) -> RollbackRequest:
    """Check a rollback request's fields (the edit is looked up by the worker)."""
    if isinstance(edit, bool) or not isinstance(edit, (int, str)):
        raise RequestError("edit", f"must be an edit id or a request id, got {type(edit).__name__}")
    if isinstance(edit, int) and edit < 1:
        raise RequestError("edit", f"must be >= 1, got {edit}")
    if isinstance(edit, str):
        check_request_id(edit, "edit")
    if reason is not None:
        reason = check_text("reason", reason, max_chars_default())
    if not isinstance(exact, bool):
        raise RequestError("exact", f"must be true or false, got {type(exact).__name__}")
    request_id = new_request_id() if request_id is None else check_request_id(request_id)
    return RollbackRequest(edit, request_id, reason, exact, check_name(name))


@dataclass(frozen=True)
class ReplayRequest:
    """Rebuild a memory from its ledger and check it (changes nothing): from sequence number
    `from_seq` on, re-training the edits (`retrain`) or summing their recorded deltas (`sum`)."""

    request_id: str
    from_seq: int = 1
    mode: str = "retrain"
    name: str = DEFAULT_NAME

    def to_message(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "from_seq": self.from_seq, "mode": self.mode, "name": self.name}

    def payload_hash(self) -> str:
        return _payload_hash(self.to_message())


def validate_replay(*, from_seq: object = 1, mode: object = "retrain", name: object = DEFAULT_NAME,
                    request_id: object = None) -> ReplayRequest:
    """Check a replay request's fields."""
    if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
        raise RequestError("from_seq", f"must be a sequence number >= 1, got {from_seq!r}")
    if mode not in REPLAY_MODES:
        raise RequestError("mode", f"must be one of {', '.join(REPLAY_MODES)}, got {mode!r}")
    request_id = new_request_id() if request_id is None else check_request_id(request_id)
    return ReplayRequest(request_id, from_seq, mode, check_name(name))  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_NAME", "EditLine", "EditRequest", "REPLAY_MODES", "ReplayRequest", "RequestError", "RollbackRequest", "SAME_PROMPT",
    "check_bounds", "check_name", "edit_request_json_schema", "request_error", "check_replaces", "check_request_id", "check_text", "check_unique_ids", "json_depth",
    "max_chars_default", "new_request_id", "read_edit_file", "scan_edit_file", "record_to_request", "validate_edit",
    "validate_replay", "validate_rollback",
]
