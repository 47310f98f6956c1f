"""JSON log lines: one object per line, the context fields where they apply, secrets redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from pipelines.log_context import JsonFormatter, with_message, with_step
from pipelines.message import Message
from pipelines.secrets import RedactingFilter, SecretSource


def json_logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test.json_logs")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, out


def test_context_fields_extra_and_redaction():
    secret = "sk_json_log_secret_9876"
    SecretSource({"TOKEN": secret}).resolve("$TOKEN")  # the process now knows it as a secret
    log, out = json_logger()

    async def work(device: str) -> None:
        with_message(Message.new(device_id=device, project_id="demo", path="/x",
                                 content_type="text/plain", payload=b"", id=f"id-{device}"))
        with_step("camera", "predict")
        await asyncio.sleep(0)
        log.warning("sent %s to the API", secret)

    async def both() -> None:  # two tasks at once: each line keeps its own task's context
        await asyncio.gather(work("cam-1"), work("cam-2"))
    asyncio.run(both())
    log.info("no context here", extra={"device": "cam-9"})
    try:
        raise ValueError(f"bad token {secret}")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e.get("message_id"), e.get("device"), e.get("pipeline"), e.get("step")) for e in lines[:2]] == [
        ("id-cam-1", "cam-1", "camera", "predict"), ("id-cam-2", "cam-2", "camera", "predict")]
    assert lines[0]["message"] == "sent *** to the API" and lines[0]["level"] == "WARNING"
    assert lines[2]["device"] == "cam-9" and "message_id" not in lines[2]
    assert "ValueError: bad token ***" in lines[3]["exception"]
    assert secret not in out.getvalue()
