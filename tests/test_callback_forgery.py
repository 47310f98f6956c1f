"""Prediction callbacks that cannot be forged (issue 14, finding 3), on a real HTTP face.

Before: without ``--webhook-secret`` one seen ``?c=`` token let anyone inject any result into
that device's state, as often as they liked: the token never expired, was not bound to the
prediction, and duplicates were recognised by the caller's ``webhook-id``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from pipelines import webhook_signature
from pipelines.message import Message
from pipelines.predictions_results import HOOK_PATH, TOKEN_TTL
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings
from tests.serve_process import cli

ROOT = Path(__file__).resolve().parent.parent


def prediction(pid: str, output: str = "Caption: tabby (80%)") -> bytes:
    return json.dumps({"id": pid, "status": "succeeded", "output": output, "error": None}).encode()


@pytest.fixture
async def service(tmp_path):
    (tmp_path / "secrets.yaml").write_text("REPLICATE_TOKEN: Bearer test\n")
    settings = ServiceSettings(
        router=RouterSettings(pipelines=[ROOT / "pipeline.yaml"], store_path=tmp_path / "data" / "store.db",
                              secrets_file=tmp_path / "secrets.yaml"),
        http_port=0)
    async with RouterService(settings) as svc:
        yield svc


def frame(device: str) -> Message:
    return Message.new(device_id=device, project_id="demo", path="/images", content_type="image/png", payload=b"x")


def hook_for(svc: RouterService, msg: Message, now: float | None = None) -> str:
    token = svc.results.make_token(msg, now=now)
    return f"{svc.http_url}{HOOK_PATH}?c={token}"


async def test_the_routers_own_secret_is_printed_by_pipeline_keys(service, tmp_path):
    out = cli("keys", "webhook-secret", "--store", str(tmp_path / "data" / "store.db"))
    assert out.returncode == 0 and out.stdout.strip() == service.results.webhook_secret


async def test_an_expired_token_is_refused(service):
    secret = service.results.webhook_secret
    msg = frame("cam-1")
    body = prediction("p-old")
    old = hook_for(service, msg, now=time.time() - TOKEN_TTL - 60)
    async with httpx.AsyncClient() as c:
        r = await c.post(old, content=body, headers=webhook_signature.sign(secret, "w1", None, body))
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        r = await c.post(hook_for(service, msg), content=body, headers=webhook_signature.sign(secret, "w1", None, body))
        assert r.status_code == 200
    assert (await service.router.store.counters())["ingested"] == 1


async def test_a_token_is_bound_to_its_prediction(service):
    secret = service.results.webhook_secret
    cam1, cam2 = frame("cam-1"), frame("cam-2")
    await service.router.store.remember_prediction("p-of-cam-2", cam2)
    body = prediction("p-of-cam-2", "Caption: injected")
    async with httpx.AsyncClient() as c:
        # cam-1's token, used for cam-2's prediction: refused
        r = await c.post(hook_for(service, cam1), content=body,
                         headers=webhook_signature.sign(secret, "w2", None, body))
        assert r.status_code == 401 and "another prediction" in r.json()["detail"]
    assert (await service.router.store.counters())["ingested"] == 0
    assert await service.router.get_state("demo", "cam-1", "/result") is None


async def test_one_result_per_prediction_whatever_the_webhook_id(service):
    secret = service.results.webhook_secret
    msg = frame("cam-3")
    await service.router.store.remember_prediction("p3", msg)
    body = prediction("p3")
    async with httpx.AsyncClient() as c:
        answers = []
        for webhook_id in ("w-a", "w-b", "w-c"):  # a replay under new webhook-ids
            r = await c.post(hook_for(service, msg), content=body,
                             headers=webhook_signature.sign(secret, webhook_id, None, body))
            assert r.status_code == 200
            answers.append(r.json())
    assert [a["duplicate"] for a in answers] == [False, True, True]
    assert len({a["message_id"] for a in answers}) == 1
    books = await service.router.store.counters()
    assert books["ingested"] == 1 and books["duplicates"] == 2


async def test_refused_callbacks_are_rate_limited_per_client(service):
    secret = service.results.webhook_secret
    body = prediction("p-guess")
    async with httpx.AsyncClient() as c:
        codes = []
        for i in range(11):  # guessing tokens
            r = await c.post(f"{service.http_url}{HOOK_PATH}?c=guess{i}.AAAA", content=body,
                             headers=webhook_signature.sign(secret, f"w{i}", None, body))
            codes.append(r.status_code)
        assert codes[:10] == [401] * 10 and codes[10] == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
