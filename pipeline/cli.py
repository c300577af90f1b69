"""The `memoir` command. Producer commands import no torch; the commands that hold a model
(eval, apply, generate, worker, replay, ...) live in `workers/` and are loaded only when called."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

# command name -> "module:attribute". Loaded on first use, so `memoir submit` never imports torch.
COMMANDS: dict[str, str] = {
    "submit": "pipeline.commands:submit",
    "status": "pipeline.commands:status",
    "queue": "pipeline.queue_commands:queue",
    "ledger": "pipeline.ledger_commands:ledger",
    "store": "pipeline.store_commands:store",
    "eval": "workers.eval_command:eval_command",
    "apply": "workers.model_commands:apply",
    "generate": "workers.model_commands:generate",
    "worker": "workers.worker_command:worker",
    "demo": "workers.demo:demo",
    "rollback": "workers.rollback_commands:rollback",
    "replay": "workers.rollback_commands:replay",
    "serve": "serving.command:serve",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when they are run (or listed in --help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                return None  # not built yet
            raise
        return getattr(module, attribute)


def emit_json(payload: Any) -> None:
    """Scripts read the last line of stdout: one JSON object."""
    click.echo(json.dumps(payload, default=str, sort_keys=True))


def fail(message: str, code: int = 1) -> None:
    """Stop with a clear message on stderr and a non-zero exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memoir-service", prog_name="memoir")
def main() -> None:
    """memoir: keep a deployed LLM's knowledge up to date, one MEMOIR edit at a time."""


if __name__ == "__main__":
    main()
