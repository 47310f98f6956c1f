"""The web console in a real browser: Debian's Chromium, headless, driven by Playwright.

Real parts: the router with its HTTP face, CoAP over DTLS and the shipped pipeline.yaml, the
local predictions service with its real model, two simulated cameras (device_sim) with their
own PSK identities, an HTTP sink (tests/delivery_sink.py) for a pipeline that dead-letters,
and Chromium (``/usr/bin/chromium``, installed by ``./dev``; missing, the test fails).
The main page's screenshot is saved under the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest
from delivery_sink import Answer, Sink
from playwright.async_api import async_playwright

from device_sim.camera import CameraConfig
from device_sim.fleet import Fleet
from device_sim.identity import fleet_identities, write_registry
from pipelines.ingest.coap import CoapSettings
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings
from predictions_service.app import running
from predictions_service.settings import Settings as PredictionSettings
from predictions_service.settings import new_webhook_secret

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_console_test_token_1234"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

ALERTS = """
pipelines:
  alerts:
    filter: {{path: /alerts}}
    steps:
      - name: notify
        destination: {{type: webhook, version: v1, parameters: {{url: "{url}"}}}}
"""


async def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
async def browser():
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), "Chromium missing: run ./dev setup"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def running_chain(tmp_path, sink):
    """Router (HTTP face with the console, CoAP/DTLS) + local predictions + two cameras."""
    secret = new_webhook_secret()
    (tmp_path / "secrets.yaml").write_text(f"REPLICATE_TOKEN: Bearer {TOKEN}\n")
    (tmp_path / "alerts.yaml").write_text(ALERTS.format(url=sink.url("/alerts")))
    identities = fleet_identities(2, seed=11, project_id="demo")
    registry = write_registry(tmp_path / "devices.yaml", identities)
    async with running(PredictionSettings(port=0, tokens=(TOKEN,), webhook_secret=secret)) as api_url:
        router = RouterSettings(pipelines=[ROOT / "pipeline.yaml", tmp_path / "alerts.yaml"],
                                store_path=tmp_path / "store.db", secrets_file=tmp_path / "secrets.yaml",
                                url_overrides={"https://api.replicate.com": api_url})
        router.extra["http_ingest"] = True
        settings = ServiceSettings(router=router, http_port=0, webhook_secret=secret,
                                   coap=CoapSettings(host="127.0.0.1", dtls_port=0, registry_path=registry))
        async with RouterService(settings) as service:
            fleet = Fleet(identities, CameraConfig(host="127.0.0.1", port=service.coap_dtls_port,
                                                   interval=1.0), seed=11)
            async with fleet:
                yield service, fleet


async def test_console_shows_cameras_pipelines_and_replays_a_dead_letter(running_chain, browser, sink,
                                                                         tmp_path):
    service, fleet = running_chain
    base = service.http_url + "/console"
    page = await browser.new_page(viewport={"width": 1100, "height": 900})

    # -- the devices page, live: each camera's card gets a thumbnail and a caption -------
    await page.goto(base + "/")
    await page.wait_for_selector("#live.on", timeout=10_000)  # the event stream is connected
    for cam in fleet.cameras:
        card = page.locator(f'.card[data-device="{cam.device_id}"]')
        await card.wait_for(timeout=30_000)
        # the image is served by the router and decoded by the browser
        await page.wait_for_function(
            """dev => { const i = document.querySelector(`.card[data-device="${dev}"] img.frame`);
                        return i && i.complete && i.naturalWidth > 0; }""",
            arg=cam.device_id, timeout=30_000)
        await page.wait_for_function(
            """dev => document.querySelector(`.card[data-device="${dev}"] [data-field=caption]`)
                       .textContent.startsWith("Caption: ")""",
            arg=cam.device_id, timeout=60_000)
        assert "DTLS 127.0.0.1" in await card.inner_text()
        assert (await card.locator('[data-field="latency"]').inner_text()).endswith(" ms")
    # the captions came live: the page was never reloaded, and a new answer still arrives
    before = await page.locator('[data-field="answers"]').first.inner_text()
    await page.wait_for_function(
        "n => document.querySelector('[data-field=answers]').textContent !== n", arg=before, timeout=30_000)
    shot = tmp_path / "console-devices.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"\nconsole screenshot: {shot}")

    # -- a pipeline: its steps with counters, and its YAML ------------------------------------
    await page.click("nav >> text=Pipelines")
    await page.click("h2 >> text=camera-caption")
    await page.wait_for_selector('table.steps tr[data-step="predict"]')
    delivered = page.locator('tr[data-step="predict"] [data-col="delivered"]')
    assert int(await delivered.inner_text()) > 0
    assert "api.replicate.com/v1/predictions" in await page.locator("pre.yaml").inner_text()
    assert "balanced" in await page.locator("#books").inner_text()

    # -- a dead letter: the sink refuses (400, permanent), then is fixed; replay it ---------
    sink.answer("/alerts", lambda n: Answer(400) if n == 0 else Answer(204))
    async with httpx.AsyncClient() as client:
        r = await client.post(service.http_url + "/v1/ingest/demo/door-1/alerts", content=b'{"open":true}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 202

    async def one_dead() -> bool:
        return (await service.router.store.counters())["dead_letters_open"] == 1
    await wait_until(one_dead, 20, "the alert to be dead-lettered")
    await page.click("nav >> text=Dead letters")
    assert await page.locator("#open-count").inner_text() == "1"
    row = page.locator("tr[data-id]")
    assert await row.count() == 1
    assert "door-1" in await row.inner_text() and "alerts / notify" in await row.inner_text()
    await row.locator('input[name="id"]').check()
    await page.click("#replay")
    await page.wait_for_selector(".flash")
    assert "replayed 1 of 1" in await page.locator(".flash").inner_text()
    assert await page.locator("#open-count").inner_text() == "0"

    async def delivered_after_replay() -> bool:
        return len(sink.got("/alerts")) == 2
    await wait_until(delivered_after_replay, 20, "the replayed alert to reach the sink")
    assert sink.got("/alerts")[1].body == b'{"open":true}'


async def test_console_pages_work_on_a_phone_sized_screen(running_chain, browser, tmp_path):
    service, _ = running_chain
    page = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    await page.goto(service.http_url + "/console/")
    await page.locator(".card").first.wait_for(timeout=30_000)
    # the cards stack in one column and nothing is wider than the screen
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    await page.wait_for_selector(".card img.frame", timeout=30_000)
    await page.screenshot(path=str(tmp_path / "console-phone-devices.png"))
    for path in ("/console/pipelines", "/console/dead-letters"):
        await page.goto(service.http_url + path)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390, path
    await page.goto(service.http_url + "/console/pipelines/camera-caption")
    await page.screenshot(path=str(tmp_path / "console-phone-pipeline.png"), full_page=True)
    print(f"\nphone screenshots: {tmp_path}/console-phone-*.png")
