"""Secrets redacted in every form they travel in (issue 14, finding 6).

Before, only the exact string was caught: a secret percent-encoded in a URL, a secret in URL
userinfo that came back as ``Basic base64(user:pass)``, a secret inside a payload shown base64,
all leaked into logs, dead-letter excerpts, ``/v1/dead-letters`` and ``pipeline dlq``. Here a
real ``pipeline serve`` delivers to a real server that quotes back what it was sent.
"""

from __future__ import annotations

import base64
import json
import random
import re
import secrets
import threading
from urllib.parse import quote, quote_plus

import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from pipelines.secrets import redact, remember, secret_forms
from tests.delivery_sink import free_port
from tests.serve_process import cli, dead_letters_soon, serving

SEED = random.randrange(1 << 30)
print(f"seed {SEED}")


def every_form(secret: str) -> list[str]:
    """What a reader would search the output for."""
    raw = secret.encode()
    forms = [secret, quote(secret, safe=""), quote_plus(secret), base64.b64encode(raw).decode(),
             base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    return [f for f in forms if len(f) >= 6]


def test_redact_finds_each_form():
    rnd = random.Random(SEED)
    secret = "s3cr/t+" + "".join(rnd.choice("abcdefXYZ0123|!") for _ in range(12))
    remember(secret)
    for form in secret_forms(secret):
        assert secret not in redact(f"x {form} y") and "***" in redact(f"x {form} y")
    assert redact("https://u:" + quote(secret, safe="") + "@h/") == "https://u:***@h/"
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe=""))
    assert redact(f"?k={lower_hex}") == "?k=***"
    basic = base64.b64encode(f"admin:{secret}".encode()).decode()
    assert redact(f"Authorization: Basic {basic}") == "Authorization: Basic ***"
    assert redact("Basic dXNlcjpwYXNz") == "Basic dXNlcjpwYXNz"  # credentials without a secret stay
    # a payload that contains the secret, shown base64, at each alignment and in both alphabets
    for prefix in (b"", b"a", b"ab", b"abc"):
        doc = prefix + b'{"token":"' + secret.encode() + b'","n":1}'
        for enc in (base64.b64encode(doc).decode(), base64.urlsafe_b64encode(doc).decode()):
            out = redact(enc)
            assert "***" in out
            # a reader who decodes what is shown, at any alignment, does not get the secret back
            rest = out.replace("***", "").replace("-", "+").replace("_", "/").rstrip("=")
            for start in range(4):
                piece = rest[start:][: (len(rest) - start) // 4 * 4]
                assert secret.encode() not in base64.b64decode(piece)


class Echo:
    """A real HTTP server that refuses every request and quotes back its URL and credentials,
    as careless services do."""

    def __init__(self) -> None:
        async def echo(request: Request) -> PlainTextResponse:
            return PlainTextResponse(f"denied {request.url} with {request.headers.get('authorization')}",
                                     status_code=401)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/{p:path}", echo, methods=["POST"])]),
                                                    port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Echo:
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def echo():
    with Echo() as e:
        yield e


async def test_no_form_of_a_secret_in_logs_dead_letters_http_or_cli(tmp_path, echo):
    rnd = random.Random(SEED)
    password = "pw" + "".join(rnd.choice("abcdefghjkmnpq23456789") for _ in range(18))
    key = "k-y|" + secrets.token_hex(8) + "^+"   # characters the request URL carries percent-encoded
    pipeline = {"pipelines": {"out": {"filter": {"path": "/x"}, "steps": [{"name": "hook", "destination": {
        "type": "webhook", "parameters": {
            "url": f"http://admin:${{PASSWORD}}@127.0.0.1:{echo.port}/hook?key=${{KEY}}"}}}]}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(yaml.safe_dump({"PASSWORD": password, "KEY": key}))
    secrets_file.chmod(0o600)
    inner = base64.b64encode(b'{"api":"' + key.encode() + b'"}').decode()   # the secret inside base64
    payload = json.dumps({"blob": inner, "raw": key}).encode()
    async with serving(tmp_path, "--secrets", str(secrets_file), "--http-ingest", "--log-level", "INFO") as srv, \
            httpx.AsyncClient(base_url=srv.url) as c:
        r = await c.post("/v1/ingest/demo/dev-1/x", content=payload, headers={"content-type": "application/json"})
        assert r.status_code == 202
        letters = await dead_letters_soon(c)
        assert letters and letters[0]["last_status"] == 401
        answer = (await c.get("/v1/dead-letters")).text
        assert "denied" in letters[0]["response_excerpt"] and "***" in letters[0]["response_excerpt"]
    logs = srv.stderr()
    store = str(srv.store)
    basic = base64.b64encode(f"admin:{password}".encode()).decode()

    def leaks(where: str, out: str) -> None:
        for secret in (password, key):
            for form in every_form(secret):
                assert form not in out, (where, form)
        assert basic not in out, where
        assert inner[4:-4] not in out, where

    listed = cli("dlq", "list", "--json", "--store", store, "--pipelines", str(tmp_path / "p.yaml"),
                 "--secrets", str(secrets_file))
    assert listed.returncode == 0
    for where, out in (("logs", logs), ("/v1/dead-letters", answer), ("dlq list", listed.stdout)):
        leaks(where, out)
    shown = cli("dlq", "show", str(letters[0]["id"]), "--json", "--payload", "--store", store,
                "--pipelines", str(tmp_path / "p.yaml"), "--secrets", str(secrets_file))
    text = cli("dlq", "show", str(letters[0]["id"]), "--payload", "--store", store,
               "--pipelines", str(tmp_path / "p.yaml"), "--secrets", str(secrets_file))
    assert shown.returncode == text.returncode == 0
    leaks("dlq show --json", shown.stdout)
    leaks("dlq show", text.stdout)
    assert json.loads(shown.stdout)["payload_redacted"]
