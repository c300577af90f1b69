"""The `memoir` command. Producer commands import no torch; the commands that hold a model
(eval, apply, generate, worker, replay, ...) live in `workers/` and are loaded only when called."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, NoReturn

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


# Exit statuses, the same for every command (README, "Exit status").
EXIT_FAILED = 1       # an edit (or rollback, replay, verify) was tried and failed
EXIT_INVALID = 2      # invalid input: a bad option or value, a refused request, a store/memory/edit that does not exist
EXIT_UNAVAILABLE = 3  # a timeout, or a service (Redis, the database) that does not answer


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Stop with a clear message on stderr and a non-zero exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _unavailable(exc: BaseException) -> bool:
    """A service that does not answer: Redis (redis-py, kombu) or the ledger's database."""
    for module, names in (("redis", ("ConnectionError", "TimeoutError")),
                          ("kombu.exceptions", ("OperationalError",)),
                          ("peewee", ("OperationalError", "InterfaceError")),
                          ("pipeline.client", ("BrokerError",))):
        loaded = sys.modules.get(module)
        if loaded is not None and any(isinstance(exc, getattr(loaded, n, ())) for n in names):
            return True
    return False


class MemoirGroup(click.Group):
    """Turns what escapes a command into the documented exit statuses: a malformed setting (2),
    a service that does not answer (3). Everything else propagates."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is one of the two kinds
            settings = sys.modules.get("pipeline.settings")
            if settings is not None and isinstance(exc, settings.SettingsError):
                fail(str(exc), EXIT_INVALID)
            if _unavailable(exc):
                fail(f"unavailable: {exc}", EXIT_UNAVAILABLE)
            raise


ENV_PREFIX = "MEMOIR"


def name_envvars(command: click.Command, prefix: str) -> click.Command:
    """Every option of `command` (and of its subcommands) can be set by the environment variable
    named after its command path and its long flag: `memoir worker --device` is
    `MEMOIR_WORKER_DEVICE`, `memoir ledger list --store` is `MEMOIR_LEDGER_LIST_STORE`, `--n-iter`
    is `..._N_ITER`. (click's own auto_envvar_prefix names them after the Python parameter, which
    is not always the flag.) The command line wins over the environment."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None and param.allow_from_autoenv:
            flags = [o for o in param.opts if o.startswith("--")] or param.opts
            flag = max(flags, key=len).lstrip("-").replace("-", "_").upper()
            param.envvar = f"{prefix}_{flag}"
            param.show_envvar = True  # --help names it
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            name_envvars(sub, f"{prefix}_{sub_name.upper().replace('-', '_')}")
    return command


class LazyGroup(MemoirGroup):
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
        return name_envvars(getattr(module, attribute), f"{ENV_PREFIX}_{name.upper()}")


def emit_json(payload: Any) -> None:
    """Scripts read the last line of stdout: one JSON object."""
    click.echo(json.dumps(payload, default=str, sort_keys=True))


# Every option can also be set as MEMOIR_<COMMAND>_<OPTION> (e.g. MEMOIR_WORKER_DEVICE; see name_envvars).
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": ENV_PREFIX})
@click.version_option(package_name="memoir-service", prog_name="memoir")
def main() -> None:
    """memoir: keep a deployed LLM's knowledge up to date, one MEMOIR edit at a time.

    \b
    Exit status: 0 done; 1 an edit, rollback, replay or verification failed;
    2 invalid input (bad option or value, refused request, no such store, memory or edit);
    3 a timeout or a service that does not answer (Redis, the ledger's database).
    Every option can also be set as MEMOIR_<COMMAND>_<OPTION> (see each command's --help)."""


if __name__ == "__main__":
    main()
