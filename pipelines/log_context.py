"""Log lines that say which message, device, pipeline and step they are about, and JSON logs.

Usage::

    setup_logging("INFO", "json")          # one JSON object per line on stderr, redacted
    with_message(message)                  # in a task routing/delivering ``message``
    with_step("camera", "predict")         # while a step runs (reset with the returned token)
    log.warning("...", extra={"device": "cam-1"})   # explicit fields win over the context

The context lives in ``contextvars`` (each asyncio task has its own copy), so the engine,
delivery and router set it where they start work on a message and every log call below
them, in any module, carries it. ``JsonFormatter`` writes ``time``, ``level``, ``logger``,
``message`` and, where they apply, ``message_id``, ``device``, ``project``, ``pipeline``,
``step`` and ``exception``. Redaction (``pipelines.secrets.RedactingFilter``) runs on the
handler before the formatter, as for text logs; the context fields are redacted too.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from pipelines.secrets import install_log_redaction, redact

# (message id, device, project) and (pipeline, step) of the work under way in this task
MESSAGE: ContextVar[tuple[str, str, str] | None] = ContextVar("log_message", default=None)
STEP: ContextVar[tuple[str, str] | None] = ContextVar("log_step", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("message_id", "device", "project", "pipeline", "step")


def with_message(message: Any) -> Token:
    return MESSAGE.set((message.id, message.device_id, message.project_id))


def with_step(pipeline: str, step: str) -> Token:
    return STEP.set((pipeline, step))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        m, s = MESSAGE.get(), STEP.get()
        if m is not None:
            out["message_id"], out["device"], out["project"] = m
        if s is not None:
            out["pipeline"], out["step"] = s
        for name in FIELDS:  # extra={...} wins over the context
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        for name in FIELDS:
            if isinstance(out.get(name), str):
                out[name] = redact(out[name])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str | int, fmt: str = "text") -> None:
    """``logging.basicConfig`` on stderr in ``fmt`` ("text" or "json"), then redaction."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # like basicConfig: nothing changes if the root logger has handlers already (a test's)
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
    install_log_redaction()
