"""The console behind the HTTP face's API keys (pipelines.http_auth): no key, 401; the login
form sets an HttpOnly cookie; a read key sees the pages but cannot replay or fetch exact bytes;
an admin key can. Real router, real keys in its store, httpx and Debian's Chromium."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from delivery_sink import Answer, Sink
from playwright.async_api import async_playwright
from test_console_browser import ALERTS, CHROMIUM, CHROMIUM_ARGS

from pipelines.http_auth import KeyStore
from pipelines.message import Message
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings


@pytest.fixture
async def keyed(tmp_path):
    sink = Sink().start()
    sink.answer("/a", lambda n: Answer(400) if n == 0 else Answer(204))
    (tmp_path / "p.yaml").write_text(ALERTS.format(url=sink.url("/a")))
    store = tmp_path / "store.db"
    keys = KeyStore(store)
    _, read = keys.create("read", name="viewer")
    _, admin = keys.create("admin", name="operator")
    settings = ServiceSettings(router=RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=store),
                               http_port=0)
    try:
        async with RouterService(settings) as svc:
            await svc.router.accept(Message.new(device_id="door", project_id="p", path="/alerts",
                                                content_type="text/plain", payload=b"open"))
            for _ in range(200):
                if await svc.router.store.dead_letters():
                    break
                await asyncio.sleep(0.05)
            yield svc, read, admin, sink
    finally:
        sink.stop()


async def test_without_a_key_the_console_answers_401_and_static_files_still_load(keyed):
    svc, read, admin, _ = keyed
    dl = (await svc.router.store.dead_letters())[0].id
    async with httpx.AsyncClient(base_url=svc.http_url) as c:
        for path in ("/console/", "/console/pipelines", "/console/dead-letters", f"/console/dead-letters/{dl}",
                     "/console/events", "/console/devices/p/door", "/console/cards"):
            r = await c.get(path)
            assert r.status_code == 401, path
            r = await c.get(path, headers={"Accept": "text/html"})  # a browser: the login form
            assert r.status_code == 401 and "<form" in r.text and "API key" in r.text, path
        r = await c.get("/console/", headers={"Authorization": "Bearer iotp_00000000_wrong"})
        assert r.status_code == 401
        assert (await c.get("/console/static/console.css")).status_code == 200
        # a read key reads, but neither replays nor gets exact bytes
        h = {"Authorization": f"Bearer {read}", "Origin": svc.http_url}
        assert (await c.get("/console/dead-letters", headers=h)).status_code == 200
        assert (await c.get(f"/console/dead-letters/{dl}/payload", headers=h)).status_code == 200
        assert (await c.get(f"/console/dead-letters/{dl}/payload?exact=1", headers=h)).status_code == 403
        assert (await c.post("/console/dead-letters/replay", data={"id": str(dl)}, headers=h)).status_code == 403
        assert (await svc.router.store.counters())["dead_letters_open"] == 1
        h = {"Authorization": f"Bearer {admin}", "Origin": svc.http_url}
        assert (await c.get(f"/console/dead-letters/{dl}/payload?exact=1", headers=h)).content == b"open"


async def test_a_browser_logs_in_with_a_key_and_only_admin_replays(keyed):
    svc, read, admin, sink = keyed
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            r = await page.goto(svc.http_url + "/console/dead-letters")
            assert r.status == 401
            await page.fill("input[name=key]", "iotp_deadbeef_not-a-key")
            async with page.expect_navigation():
                await page.click("button:has-text('Log in')")
            assert "That key is not valid" in await page.content()
            await page.fill("input[name=key]", read)
            await page.click("button:has-text('Log in')")
            await page.wait_for_selector("#open-count")
            assert page.url.endswith("/console/dead-letters")
            cookie = next(c for c in await page.context.cookies() if c["name"] == "pipeline_console_key")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            await page.locator("tr[data-id] input[name=id]").check()
            async with page.expect_response(lambda r: "/dead-letters/replay" in r.url) as info:
                await page.click("#replay")
            assert (await info.value).status == 403  # read scope
            await page.goto(svc.http_url + "/console/logout")
            await page.fill("input[name=key]", admin)
            async with page.expect_navigation():
                await page.click("button:has-text('Log in')")
            await page.goto(svc.http_url + "/console/dead-letters")
            await page.locator("tr[data-id] input[name=id]").check()
            await page.click("#replay")
            await page.wait_for_selector(".flash")
            assert "replayed 1 of 1" in await page.locator(".flash").inner_text()
            assert await page.locator("#open-count").inner_text() == "0"
        finally:
            await browser.close()
    for _ in range(200):
        if len(sink.got("/a")) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(sink.got("/a")) == 2


async def test_the_login_form_is_no_way_around_the_wrong_key_limit(keyed):
    svc, read, _, _ = keyed
    async with httpx.AsyncClient(base_url=svc.http_url) as c:
        for _ in range(10):
            r = await c.post("/console/login", data={"key": "iotp_00000000_guess"})
            assert r.status_code == 401
        r = await c.post("/console/login", data={"key": read})  # even the right key, for now
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
