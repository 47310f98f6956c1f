"""The console over plain HTTP (httpx against the real router): what a browser test does not
reach: bad requests, redaction of dead letters, cross-site posts, the login page without keys."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from delivery_sink import Answer, Sink

from pipelines.message import Message
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings

SECRET = "sk_live_console_test_secret_value"
PIPELINE = """
pipelines:
  alerts:
    filter: {{path: /alerts}}
    steps:
      - name: notify
        destination:
          type: webhook
          version: v1
          parameters: {{url: "{url}", headers: {{Authorization: $ALERT_TOKEN}}}}
"""


@pytest.fixture
async def service(tmp_path, monkeypatch):
    sink = Sink().start()
    sink.answer("/a", lambda n: Answer(400, body=b"no"))
    monkeypatch.setenv("ALERT_TOKEN", SECRET)
    (tmp_path / "p.yaml").write_text(PIPELINE.format(url=sink.url("/a")))
    settings = ServiceSettings(router=RouterSettings(pipelines=[tmp_path / "p.yaml"],
                                                     store_path=tmp_path / "s.db"), http_port=0)
    try:
        async with RouterService(settings) as svc:
            yield svc
    finally:
        sink.stop()


async def dead_letter(svc: RouterService, payload: bytes) -> int:
    await svc.router.accept(Message.new(device_id="door", project_id="p", path="/alerts",
                                        content_type="text/plain", payload=payload))
    for _ in range(200):
        letters = await svc.router.store.dead_letters()
        if letters:
            return letters[0].id
        await asyncio.sleep(0.05)
    raise AssertionError("no dead letter")


async def test_dead_letter_bytes_are_redacted_unless_asked_exactly(service):
    dl = await dead_letter(service, f"token was {SECRET}".encode())
    async with httpx.AsyncClient(base_url=service.http_url) as c:
        page = (await c.get(f"/console/dead-letters/{dl}")).text
        assert SECRET not in page and "token was ***" in page
        r = await c.get(f"/console/dead-letters/{dl}/payload")
        assert r.content == b"token was ***" and r.headers["x-payload-redacted"] == "true"
        r = await c.get(f"/console/dead-letters/{dl}/payload?exact=1")
        assert r.content == f"token was {SECRET}".encode()
        listing = (await c.get("/console/dead-letters?format=json")).json()
        assert [d["id"] for d in listing] == [dl]
        assert (await c.get("/console/dead-letters?pipeline=other&format=json")).json() == []


async def test_posts_from_another_site_are_refused_and_nothing_changes(service):
    dl = await dead_letter(service, b"x")
    async with httpx.AsyncClient(base_url=service.http_url) as c:
        for action in ("replay", "purge"):
            r = await c.post(f"/console/dead-letters/{action}", data={"id": str(dl)},
                             headers={"Origin": "https://evil.example"})
            assert r.status_code == 403
            r = await c.post(f"/console/dead-letters/{action}", data={"id": str(dl)})  # no Origin at all
            assert r.status_code == 403
        assert (await service.router.store.counters())["dead_letters_open"] == 1
        r = await c.post("/console/dead-letters/purge", data={"id": [str(dl), "junk", "-3"]},
                         headers={"Origin": service.http_url})
        assert r.status_code == 303 and "purged+1+of+1" in r.headers["location"]
        assert (await service.router.store.counters())["dead_letters_open"] == 0


async def test_unknown_things_are_404_and_the_static_files_and_login_page_serve(service):
    async with httpx.AsyncClient(base_url=service.http_url) as c:
        assert (await c.get("/console/pipelines/nope")).status_code == 404
        assert (await c.get("/console/dead-letters/99999")).status_code == 404
        assert (await c.get("/console/devices/p/nobody/frame")).status_code == 404
        assert (await c.get("/console/dead-letters/abc")).status_code == 404
        r = await c.get("/console/static/console.css")
        assert r.status_code == 200 and "text/css" in r.headers["content-type"]
        assert "no API keys" in (await c.get("/console/login")).text
        r = await c.get("/console/devices/p/nobody")
        assert r.status_code == 200 and "version 0" in r.text
        r = await c.get("/console/pipelines?format=json")
        assert r.json()["pipelines"][0]["steps"][0]["name"] == "notify"
