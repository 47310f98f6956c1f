"""Webhooks from the local predictions service to a real HTTP receiver on loopback.

Every delivery is checked with the router's verifier (``pipelines.webhook_signature.verify``) and the
secret the service publishes at ``GET /v1/webhooks/default/secret``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipelines.webhook_signature import verify
from predictions_service import Settings, blip, running
from predictions_service.model import Classifier
from predictions_service.records import Prediction
from predictions_service.runner import PredictionRunner
from predictions_service.webhooks import WebhookSender

TOKEN = "r8_webhook_suite"
VERSION = blip.VERSION


def tiny_png_url() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


TINY = tiny_png_url()


@dataclass
class Hook:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def prediction(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver that records every POST and answers from a list of status codes."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []
        self.statuses: list[int] = []

        async def hook(request: Request) -> Response:
            body = await request.body()
            self.hooks.append(
                Hook(
                    request.url.path + "?" + request.url.query, dict(request.headers), body, time.monotonic()
                )
            )
            return Response(status_code=self.statuses.pop(0) if self.statuses else 204)

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Hook]:
        deadline = time.monotonic() + timeout
        while len(self.hooks) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.hooks


def tcp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def receiving(sock: socket.socket | None = None) -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    sock = sock or tcp_socket()
    server = uvicorn.Server(uvicorn.Config(receiver.app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield receiver, f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@contextlib.asynccontextmanager
async def service(classifier: Classifier, **overrides) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The service and a client for it; yields the secret fetched from the API, as a router would."""
    overrides.setdefault("webhook_retry_delays", (0.2, 0.4, 0.8))
    settings = Settings(port=0, tokens=(TOKEN,), log_level="warning", **overrides)
    async with running(settings, PredictionRunner(settings, classifier=classifier)) as url:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            secret = (await client.get("/v1/webhooks/default/secret")).json()["key"]
            yield client, secret


def verified(hook: Hook, secret: str) -> dict:
    verify(secret, hook.headers, hook.body)
    assert hook.headers["content-type"] == "application/json"
    assert hook.headers["webhook-id"].startswith("msg_")
    return hook.prediction


async def test_start_and_completed_are_signed_and_in_order(classifier):
    async with receiving() as (receiver, url), service(classifier) as (api, secret):
        r = await api.post(
            "/v1/predictions",
            json={
                "version": VERSION,
                "input": {"image": TINY},
                "webhook": url + "?c=frame-17",
                "webhook_events_filter": ["start", "completed"],
            },
        )
        pred_id = r.json()["id"]
        hooks = await receiver.wait_for(2)
        await asyncio.sleep(0.3)  # nothing else may follow
        assert len(hooks) == 2
        first, last = (verified(h, secret) for h in hooks)
        assert all(h.path == "/hook?c=frame-17" for h in hooks)  # the query string is kept
        assert first["id"] == last["id"] == pred_id
        assert first["status"] == "processing" and first["output"] is None
        assert last["status"] == "succeeded" and last["output"].startswith("Caption: ")
        assert hooks[0].headers["webhook-id"] != hooks[1].headers["webhook-id"]
        assert last == (await api.get(f"/v1/predictions/{pred_id}")).json()


async def test_no_filter_means_every_event(classifier):
    async with receiving() as (receiver, url), service(classifier) as (api, secret):
        await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": TINY}, "webhook": url})
        hooks = await receiver.wait_for(3)
        await asyncio.sleep(0.3)
        statuses = [verified(h, secret)["status"] for h in hooks]
        assert statuses == ["processing", "processing", "succeeded"]  # start, output+logs, completed
        assert hooks[1].prediction["output"] is not None and hooks[1].prediction["logs"]


async def test_failed_prediction_is_delivered_as_completed(classifier):
    async with receiving() as (receiver, url), service(classifier) as (api, secret):
        await api.post(
            "/v1/predictions",
            json={
                "version": VERSION,
                "input": {"image": "data:,not an image"},
                "webhook": url,
                "webhook_events_filter": ["completed"],
            },
        )
        hooks = await receiver.wait_for(1)
        pred = verified(hooks[0], secret)
        assert pred["status"] == "failed" and pred["error"].startswith("image: cannot decode")


async def test_terminal_webhook_is_retried_with_the_same_id(classifier):
    async with receiving() as (receiver, url), service(classifier) as (api, secret):
        receiver.statuses = [500, 404]
        await api.post(
            "/v1/predictions",
            json={
                "version": VERSION,
                "input": {"image": TINY},
                "webhook": url,
                "webhook_events_filter": ["completed"],
            },
        )
        hooks = await receiver.wait_for(3)
        assert len(hooks) == 3
        assert len({h.headers["webhook-id"] for h in hooks}) == 1
        assert all(verified(h, secret)["status"] == "succeeded" for h in hooks)
        assert hooks[1].at - hooks[0].at >= 0.19 and hooks[2].at - hooks[1].at >= 0.39  # backing off
        await asyncio.sleep(1.0)
        assert len(receiver.hooks) == 3  # the 2xx ended it


async def test_terminal_webhook_is_retried_after_connection_errors(classifier):
    sock = tcp_socket()  # bound but not listening yet: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    async with service(classifier, webhook_retry_delays=(0.5, 0.5, 0.5, 0.5)) as (api, secret):
        await api.post(
            "/v1/predictions",
            json={
                "version": VERSION,
                "input": {"image": TINY},
                "webhook": url,
                "webhook_events_filter": ["completed"],
            },
        )
        await asyncio.sleep(0.7)  # at least one refused attempt
        async with receiving(sock) as (receiver, _):
            hooks = await receiver.wait_for(1, timeout=5)
            assert verified(hooks[0], secret)["status"] == "succeeded"


async def test_intermediate_webhooks_are_not_retried(classifier):
    async with receiving() as (receiver, url), service(classifier) as (api, secret):
        receiver.statuses = [500]
        await api.post(
            "/v1/predictions",
            json={
                "version": VERSION,
                "input": {"image": TINY},
                "webhook": url,
                "webhook_events_filter": ["start"],
            },
        )
        await receiver.wait_for(1)
        await asyncio.sleep(0.8)  # longer than the first retry delay
        assert len(receiver.hooks) == 1 and verified(receiver.hooks[0], secret)["status"] == "processing"


async def test_output_and_logs_are_throttled_to_one_per_window():
    secret = "whsec_" + base64.b64encode(b"throttle-test-key-24byte").decode()
    async with receiving() as (receiver, url), httpx.AsyncClient() as client:
        sender = WebhookSender(secret, client, retry_delays=(), throttle_seconds=0.5)
        pred = Prediction(
            model=blip.MODEL,
            version=VERSION,
            input={},
            base_url="http://x",
            webhook=url,
            events=frozenset({"output", "logs"}),
        )
        pred.status = "processing"
        start = time.monotonic()
        for i in range(5):  # five changes within a few ms
            pred.logs += f"line {i}\n"
            sender.notify(pred, "logs")
        hooks = await receiver.wait_for(2, timeout=3)
        await asyncio.sleep(0.7)  # a window later: still only two
        assert len(receiver.hooks) == 2
        assert verified(hooks[0], secret)["logs"] == "line 0\n"  # the first went out at once
        assert hooks[1].at - start >= 0.49  # the rest waited for the 500 ms window...
        assert verified(hooks[1], secret)["logs"].endswith("line 4\n")  # ...and were coalesced into one
        await sender.close()
