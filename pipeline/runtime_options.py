"""`--device`, `--dtype`, `--threshold` and `--n-iter`: one definition for every command that loads
a model (worker, apply, generate, eval, rollback, replay, serve), so the same flag means the same
thing everywhere.

- `--device`: free text, any torch device (`cpu`, `cuda`, `cuda:1`, `mps`, ...); `auto` (the
  default) is the GPU when there is one (`cuda`, else `mps`), else the CPU. A device this machine
  does not have is refused when the command line is read (exit status 2), before any model loads.
- `--dtype`: the model's weights (`float32`, `bfloat16`, `float16`); W_m stays float32. Default:
  the model's own (float32 for the shipped and converted models).

Nothing here imports torch until a command that was given `--device` runs (`--help` stays fast).
"""

from __future__ import annotations

from typing import Callable

import click

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "torch device: cpu, cuda, cuda:1, mps, ...; 'auto' is the GPU when there is one, else the CPU"


def resolve_device(text: str) -> str:
    """A `--device` value as a torch device string; ValueError when this machine lacks it."""
    import torch

    text = (text or "auto").strip()
    if text.lower() == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{text!r} is not a torch device ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: no CUDA device is available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{text!r}: no MPS device is available on this machine")
    return str(device)


def _device_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or ctx.resilient_parsing:
        return value
    try:
        return resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def device_option(default: str = "auto", help: str = DEVICE_HELP) -> Callable:
    return click.option("--device", default=default, show_default=True, metavar="DEVICE", help=help,
                        callback=_device_callback)


def dtype_option(help: str = "model weights' dtype (W_m stays float32); default: the model's own") -> Callable:
    return click.option("--dtype", default=None, type=click.Choice(DTYPES), help=help)


def threshold_option(help: str = "retrieval threshold: the least mask overlap for a prompt to use the memory "
                                 "(a new memory; default: fitted to the model)") -> Callable:
    return click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help=help)


def n_iter_option(help: str = "optimisation steps per edit (a new memory; default: the config's)") -> Callable:
    return click.option("--n-iter", "n_iter", type=click.IntRange(min=1), default=None, help=help)


__all__ = ["DTYPES", "device_option", "dtype_option", "n_iter_option", "resolve_device",
           "threshold_option"]
