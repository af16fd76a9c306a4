"""The server's logs, with the job and worker each line comes from: ``lienzo serve --log-format text|json``.

Many workers run jobs at once, so a line alone no longer says which job it is about. The queue runs
each job inside :func:`job_context`, which sets two context variables; :class:`ContextFilter` copies
them onto every record a handler sees, from any logger (lienzo's, diffusers', uvicorn's). Context
variables, not thread-locals or a global: each thread (and each asyncio task) has its own values,
so a job's id never shows up on another worker's lines.

``json`` writes one JSON object per line for log collectors (Loki, Elasticsearch, CloudWatch); the
standard library has no JSON formatter, and the dozen lines below spare a dependency.
"""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Literal, TextIO

job_id: ContextVar[str | None] = ContextVar("lienzo_job_id", default=None)
worker: ContextVar[str | None] = ContextVar("lienzo_worker", default=None)

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")


@contextmanager
def job_context(job: str, worker_name: str | None = None) -> Iterator[None]:
    """Log lines in this block (in this thread or task) carry ``job`` and ``worker_name``; the values
    before it come back after, so that contexts nest."""
    job_token, worker_token = job_id.set(job), worker.set(worker_name)
    try:
        yield
    finally:
        worker.reset(worker_token)
        job_id.reset(job_token)


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``worker`` (None outside a job) to each record; a value given with
    ``extra=`` is kept. On a handler: a logger's filter would see only that logger's own records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = job_id.get()
        if not hasattr(record, "worker"):
            record.worker = worker.get()
        return True


def _job_tag(record: logging.LogRecord) -> str:
    """``[job abc on cpu] `` inside a job, ``[cpu] `` for a worker's own lines, else nothing."""
    job, name = getattr(record, "job_id", None), getattr(record, "worker", None)
    if job is None:
        return f"[{name}] " if name else ""
    return f"[job {job} on {name}] " if name else f"[job {job}] "


class TextFormatter(logging.Formatter):
    """``2026-11-28 04:00:00,123 INFO lienzo.server.jobs: [job abc on cpu] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(job_tag)s%(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.job_tag = _job_tag(record)
        return super().formatMessage(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, job_id, worker, and
    exception (the traceback's text) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "worker": getattr(record, "worker", None),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def current_setup() -> tuple[LogFormat, int]:
    """The format and level this process logs in, for a worker process to log the same way."""
    root = logging.getLogger()
    json_lines = any(isinstance(handler.formatter, JSONFormatter) for handler in root.handlers)
    return ("json" if json_lines else "text"), root.level


def setup_logging(format: LogFormat = "text", level: int | str | None = None, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in ``format``, replacing the root logger's
    handlers; ``level``: the root logger's level (None keeps the one set, e.g. by ``lienzo -v``).
    Returns the handler."""
    if format not in FORMATS:
        raise ValueError(f"log format: {format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    logging.basicConfig(handlers=[handler], level=root.level if level is None else level, force=True)
    return handler
