"""``logs``: store and print a structured log record from a JSON payload.

Fields ``level`` (debug/info/warn/error), ``module`` and ``msg``; any other field is kept
as metadata. The message's timestamp is the record's time.
"""

from __future__ import annotations

import logging

from destinations.base import read_json
from destinations.registry import register
from pipelines.components import ComponentError, Destination
from pipelines.message import Message

device_log = logging.getLogger("pipelines.device")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}


@register
class Logs(Destination):
    type = "logs"
    version = "1.0.0"
    summary = "A structured log record from `level`, `module`, `msg`; other fields become metadata."
    accepts = ("json",)

    async def deliver(self, message: Message) -> None:
        record = read_json(self, message)
        if not isinstance(record, dict):
            raise ComponentError("logs takes a JSON object with level, module and msg")
        level = str(record.get("level", "info")).lower()
        if level not in _LEVELS:
            raise ComponentError(f"log level {level!r} is not one of debug, info, warn, error")
        module = str(record.get("module", ""))
        msg = str(record.get("msg", ""))
        meta = {k: v for k, v in record.items() if k not in {"level", "module", "msg"}}
        if self.context.logs is not None:
            await self.context.logs.append_log(message.project_id, message.device_id,
                                               message.timestamp.timestamp(), level, module, msg, meta)
        device_log.log(_LEVELS[level], "%s [%s] %s %s", message.device_id, module, msg, meta or "")
