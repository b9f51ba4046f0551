"""Logging: JSON lines when stderr is not a terminal (a container, a supervisor, a file),
readable lines on a terminal; every line logged while a job's attempt runs carries its job id
and attempt number, from whichever thread of the attempt it comes."""

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

# (job id, attempt) of the attempt the current code runs for.
_attempt: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "gradstream_attempt", default=None
)


@contextlib.contextmanager
def attempt_context(job_id: str, attempt: int) -> Iterator[None]:
    """Within: log lines carry `job_id` and `attempt`. Threads the attempt starts inherit it
    when started through `contextvars.copy_context().run`."""
    token = _attempt.set((job_id, attempt))
    try:
        yield
    finally:
        _attempt.reset(token)


class _AttemptFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = _attempt.get()
        record.job_id, record.attempt = current if current is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            line["job_id"] = job_id
            line["attempt"] = getattr(record, "attempt", None)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        attempt = getattr(record, "attempt", None)
        return text if job_id is None else f"{text} [job {job_id} attempt {attempt}]"


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """The root logger's one handler on stderr: JSON lines unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(_AttemptFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
