"""Secret values never reach the logs: ``RedactingFilter`` on the root handlers redacts the
message, its arguments and exception tracebacks of every logger, and the CLI installs it."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from pipelines.cli import main
from pipelines.secrets import RedactingFilter

ROOT = Path(__file__).resolve().parent.parent
SECRET = "tok-s3cr3t-value-42"

SCRIPT = textwrap.dedent(f"""
    import logging, sys
    from pipelines.secrets import SecretSource, install_log_redaction
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    install_log_redaction()
    install_log_redaction()  # idempotent
    print(len(logging.getLogger().handlers[0].filters))
    token = SecretSource({{"TOKEN": "{SECRET}"}}).resolve("$TOKEN")
    log = logging.getLogger("pipelines.engine")  # a child logger: the root handler's filter applies
    log.info("calling with %s", token)
    log.warning("header Bearer " + token)
    try:
        raise RuntimeError(f"auth failed for Bearer {{token}}")
    except RuntimeError:
        log.exception("step failed for %s", "dev-1")
""")


def test_secrets_are_redacted_in_messages_and_tracebacks() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    err = proc.stderr
    assert SECRET not in err
    assert "pipelines.engine: calling with ***" in err
    assert "header Bearer ***" in err
    assert "step failed for dev-1" in err
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: auth failed for Bearer ***" in err


def test_cli_main_installs_the_filter_on_root_handlers() -> None:
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert main(["components"]) == 0
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    finally:
        root.removeHandler(handler)


HTTP_SCRIPT = textwrap.dedent(f"""
    import asyncio, logging, sys
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Route
    from pipelines.http_face import start_http, stop_http
    from pipelines.secrets import SecretSource, install_log_redaction
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    install_log_redaction()
    token = SecretSource({{"TOKEN": "{SECRET}"}}).resolve("$TOKEN")

    async def fails(request):
        raise RuntimeError(f"upstream refused Bearer {{token}}")

    async def main():
        server = await start_http(Starlette(routes=[Route("/x", fails)]), "127.0.0.1", 0)
        port = server._bound_socket.getsockname()[1]
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{{port}}/x")
        print(r.status_code)
        await stop_http(server)

    asyncio.run(main())
""")


def test_the_http_face_server_logs_pass_through_redaction() -> None:
    """uvicorn logs an unhandled exception with its traceback: through the root handlers' filter."""
    proc = subprocess.run([sys.executable, "-c", HTTP_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "500"
    assert "Exception in ASGI application" in proc.stderr
    assert "RuntimeError: upstream refused Bearer ***" in proc.stderr
    assert SECRET not in proc.stderr
