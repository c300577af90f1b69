"""Logging of `memoir worker` and `memoir serve`: plain text (the default) or, with
`--log-format json`, one JSON object per line: time, level, logger, message, and `request_id` /
`edit_id` when the record carries them (`log.info(..., extra={"request_id": ...})`). In the
worker a record logged while a task runs carries the task's id, which is the request id."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

import click

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("request_id", "edit_id")

log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Log lines on stderr: plain text, or one JSON object per line (with request_id / edit_id when known).")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update({k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class CeleryTaskId(logging.Filter):
    """Gives a record logged while a Celery task runs the task's id as its `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            from celery._state import get_current_task

            task = get_current_task()
            if task is not None and task.request.id:
                record.request_id = task.request.id
        return True


def setup(loglevel: str, log_format: str, celery_tasks: bool = False) -> bool:
    """Log to stderr at `loglevel` in `log_format`; returns whether the lines are JSON."""
    handler = logging.StreamHandler(sys.stderr)
    as_json = log_format == "json"
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    if celery_tasks:
        handler.addFilter(CeleryTaskId())
    logging.basicConfig(level=loglevel.upper(), handlers=[handler])
    if as_json:  # every stderr line JSON: warnings and transformers' own lines through logging, no progress bars
        logging.captureWarnings(True)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            pass
        else:
            hf_logging.disable_default_handler()
            hf_logging.enable_propagation()
            hf_logging.disable_progress_bar()
    return as_json


__all__ = ["JsonFormatter", "log_format_option", "setup"]
