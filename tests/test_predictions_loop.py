"""The results loop: frame → prediction (local service) → signed webhook → device state.

Real parts only: the router with its HTTP face, the local predictions service with its real
model, httpx on loopback. The default pipeline.yaml is used as shipped.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipelines import webhook_signature
from pipelines.message import Message
from pipelines.predictions_results import HOOK_PATH
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings
from predictions_service.app import running
from predictions_service.settings import Settings as PredictionSettings
from predictions_service.settings import new_webhook_secret

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_test_token_for_the_local_service"


def photo_png(name: str) -> bytes:
    img = Image.open(ROOT / "device_sim" / "data" / f"{name}.jpg").convert("RGB")
    img.thumbnail((320, 240))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def chain(tmp_path):
    secret = new_webhook_secret()
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(f"REPLICATE_TOKEN: Bearer {TOKEN}\n")
    async with running(PredictionSettings(port=0, tokens=(TOKEN,), webhook_secret=secret)) as api_url:
        settings = ServiceSettings(
            router=RouterSettings(pipelines=[ROOT / "pipeline.yaml"], store_path=tmp_path / "store.db",
                                  secrets_file=secrets_file,
                                  url_overrides={"https://api.replicate.com": api_url}),
            http_port=0, webhook_secret=secret)
        async with RouterService(settings) as service:
            yield service, secret, api_url


async def test_caption_comes_back_to_the_device_state(chain):
    service, _, _ = chain
    router = service.router
    frame = Message.new(device_id="cam-7", project_id="demo", path="/images",
                        content_type="application/octet-stream", payload=photo_png("coffee"))
    await router.accept(frame)

    async def result():
        doc = await router.get_state("demo", "cam-7", "/result")
        return doc if doc and doc.get("status") else None

    doc = await wait_for(result)
    assert doc["frame_id"] == frame.id
    assert doc["status"] == "succeeded"
    assert doc["output"].startswith("Caption: ")
    assert "espresso" in doc["output"] or "cup" in doc["output"]
    books = await router.store.counters()
    assert books["ingested"] == 2  # the frame and its result message
    assert books["deliveries_dead"] == 0


async def test_an_undecodable_frame_gets_a_failed_result_not_silence(chain):
    service, _, _ = chain
    router = service.router
    frame = Message.new(device_id="cam-8", project_id="demo", path="/images",
                        content_type="application/octet-stream", payload=b"not a png at all")
    await router.accept(frame)

    async def result():
        doc = await router.get_state("demo", "cam-8", "/result")
        return doc if doc and doc.get("status") else None

    doc = await wait_for(result)
    assert doc["frame_id"] == frame.id
    assert doc["status"] == "failed"
    assert doc["error"]


def _prediction(pid: str, status: str = "succeeded") -> bytes:
    return json.dumps({"id": pid, "status": status, "output": "Caption: tabby (80%)", "error": None,
                       "metrics": {"predict_time": 0.01}}).encode()


async def test_bad_or_stale_signatures_are_refused_and_nothing_is_ingested(chain):
    service, secret, _ = chain
    router = service.router
    seed = Message.new(device_id="cam-9", project_id="demo", path="/images",
                       content_type="image/png", payload=b"x")
    await router.store.remember_prediction("p1", seed)
    body = _prediction("p1")
    url = service.http_url + HOOK_PATH
    async with httpx.AsyncClient() as client:
        wrong = webhook_signature.sign(new_webhook_secret(), "msg_1", None, body)
        r = await client.post(url, content=body, headers=wrong)
        assert r.status_code == 401
        stale = webhook_signature.sign(secret, "msg_1", int(time.time()) - 3600, body)
        r = await client.post(url, content=body, headers=stale)
        assert r.status_code == 401
        r = await client.post(url, content=body)  # unsigned
        assert r.status_code == 401
        tampered = webhook_signature.sign(secret, "msg_1", None, body)
        r = await client.post(url, content=body.replace(b"tabby", b"tiger"), headers=tampered)
        assert r.status_code == 401
    assert (await router.store.counters())["ingested"] == 0


async def test_a_redelivered_webhook_is_stored_once(chain):
    service, secret, _ = chain
    router = service.router
    seed = Message.new(device_id="cam-9", project_id="demo", path="/images",
                       content_type="image/png", payload=b"x")
    await router.store.remember_prediction("p2", seed)
    body = _prediction("p2")
    async with httpx.AsyncClient() as client:
        for _ in range(2):  # Replicate retries with the same webhook-id
            headers = webhook_signature.sign(secret, "msg_same", None, body)
            r = await client.post(service.http_url + HOOK_PATH, content=body, headers=headers)
            assert r.status_code == 200, r.text
    books = await router.store.counters()
    assert books["ingested"] == 1
    assert books["duplicates"] == 1

    async def result():
        return await router.get_state("demo", "cam-9", "/result")
    doc = await wait_for(result)
    assert doc["frame_id"] == seed.id and doc["output"] == "Caption: tabby (80%)"


async def test_unknown_prediction_and_forged_callback_token_are_refused(chain):
    service, secret, _ = chain
    body = _prediction("never-created")
    headers = webhook_signature.sign(secret, "msg_x", None, body)
    async with httpx.AsyncClient() as client:
        r = await client.post(service.http_url + HOOK_PATH, content=body, headers=headers)
        assert r.status_code == 404
        r = await client.post(service.http_url + HOOK_PATH + "?c=eyJhIjoxfQ.AAAA", content=body,
                              headers=headers)
        assert r.status_code == 401  # a forged token is refused before the body is read
    assert (await service.router.store.counters())["ingested"] == 0


async def test_non_terminal_events_are_acknowledged_but_not_routed(chain):
    service, secret, _ = chain
    body = _prediction("p3", status="processing")
    headers = webhook_signature.sign(secret, "msg_p", None, body)
    async with httpx.AsyncClient() as client:
        r = await client.post(service.http_url + HOOK_PATH, content=body, headers=headers)
    assert r.status_code == 200 and r.json()["accepted"] is False
    assert (await service.router.store.counters())["ingested"] == 0


async def test_a_callback_the_user_chose_is_left_alone(chain):
    service, _, _ = chain
    results = service.results
    body = {"version": "x", "input": {"image": "data:,"}, "webhook": "https://example.org/mine"}
    msg = Message.new(device_id="d", path="/images", content_type="application/json",
                      payload=json.dumps(body).encode())
    assert results.add_callback(msg, "https://api.replicate.com/v1/predictions") is None
    other = results.add_callback(msg.evolve(json={"version": "x", "input": {}}),
                                 "https://api.replicate.com/v1/predictions")
    assert other is not None
    added = other.json()
    assert added["webhook"].startswith(service.http_url + HOOK_PATH + "?c=")
    assert added["webhook_events_filter"] == ["completed"]
    assert results.add_callback(msg, "https://example.org/v1/other") is None


async def test_sync_style_pipeline_from_plain_yaml(tmp_path):
    """Prefer: wait on the webhook transformer, json-patch picks the output, state gets it."""
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(f"REPLICATE_TOKEN: Bearer {TOKEN}\n")
    async with running(PredictionSettings(port=0, tokens=(TOKEN,))) as api_url:
        settings = ServiceSettings(
            router=RouterSettings(pipelines=[ROOT / "examples" / "sync-caption.yaml"],
                                  store_path=tmp_path / "store.db", secrets_file=secrets_file,
                                  url_overrides={"https://api.replicate.com": api_url}),
            http_port=None)
        async with RouterService(settings) as service:
            router = service.router
            await router.accept(Message.new(device_id="cam-3", project_id="demo", path="/images",
                                            content_type="application/octet-stream",
                                            payload=photo_png("chelsea")))

            async def caption():
                return await router.get_state("demo", "cam-3", "/caption")
            doc = await wait_for(caption)
            assert doc["status"] == "succeeded"
            assert doc["caption"].startswith("Caption: ")
            assert "cat" in doc["caption"] or "tabby" in doc["caption"]
            assert "input" not in doc  # the frame itself does not go back to the device


async def test_the_loop_over_coap_frame_id_traceable_end_to_end(tmp_path):
    """Frame in over CoAP/DTLS → prediction → signed callback → device state → Observe at the
    device; the id the router gave the frame in its 2.04 is the one in the answer."""
    from device_sim.camera import CameraConfig
    from device_sim.fleet import Fleet
    from device_sim.identity import fleet_identities, write_registry
    from pipelines.ingest.coap import CoapSettings

    secret = new_webhook_secret()
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(f"REPLICATE_TOKEN: Bearer {TOKEN}\n")
    identities = fleet_identities(1, seed=5, project_id="demo")
    registry = write_registry(tmp_path / "devices.yaml", identities)
    async with running(PredictionSettings(port=0, tokens=(TOKEN,), webhook_secret=secret)) as api_url:
        settings = ServiceSettings(
            router=RouterSettings(pipelines=[ROOT / "pipeline.yaml"], store_path=tmp_path / "store.db",
                                  secrets_file=secrets_file,
                                  url_overrides={"https://api.replicate.com": api_url}),
            http_port=0, webhook_secret=secret,
            coap=CoapSettings(host="127.0.0.1", dtls_port=0, registry_path=registry))
        async with RouterService(settings) as service:
            events = []
            fleet = Fleet(identities, CameraConfig(host="127.0.0.1", port=service.coap_dtls_port,
                                                   interval=0.2, max_frames=1), seed=5, on_event=events.append)
            cam = fleet.cameras[0]
            async with fleet:
                deadline = time.monotonic() + 30
                while cam.stats.frames_answered < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            assert cam.stats.frames_answered == 1, cam.stats.as_dict()
            acked = [e for e in events if e.kind == "acked"]
            answered = [e for e in events if e.kind == "answered"]
            assert len(acked) == 1 and len(answered) == 1
            frame_id = acked[0].frame_id
            assert answered[0].frame_id == frame_id
            assert cam.stats.last_answer.startswith("Caption: ")
            # the router's own record ties the prediction to the same frame
            doc = await service.router.get_state("demo", cam.device_id, "/result")
            assert doc["frame_id"] == frame_id and doc["status"] == "succeeded"
            where = await service.router.store.lookup_prediction(doc["prediction_id"])
            assert where["message_id"] == frame_id and where["device_id"] == cam.device_id
            # and the predictions API knows that prediction, with the same output
            async with httpx.AsyncClient() as client:
                r = await client.get(f"{api_url}/v1/predictions/{doc['prediction_id']}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200
            assert r.json()["output"] == doc["output"] == cam.stats.last_answer


async def test_without_a_webhook_secret_the_router_keeps_its_own_and_unsigned_callbacks_fail(tmp_path):
    """Issue 14, finding 3: without --webhook-secret one seen ?c= token let anyone inject
    results. Now there is always a secret (made once, kept in the store, the same after a
    restart): a token alone is not enough, the body must be signed with that secret."""
    (tmp_path / "secrets.yaml").write_text("REPLICATE_TOKEN: Bearer test\n")
    settings = ServiceSettings(
        router=RouterSettings(pipelines=[ROOT / "pipeline.yaml"], store_path=tmp_path / "store.db",
                              secrets_file=tmp_path / "secrets.yaml"),
        http_port=0, webhook_secret=None)
    async with RouterService(settings) as service:
        router = service.router
        own = service.results.webhook_secret
        assert own.startswith("whsec_")
        frame = Message.new(device_id="cam-5", project_id="demo", path="/images",
                            content_type="image/png", payload=b"x")
        await router.store.remember_prediction("p9", frame)
        body = _prediction("p9")
        hook = service.results.add_callback(
            frame.evolve(json={"version": "v", "input": {}}), "https://api.replicate.com/v1/predictions"
        ).json()["webhook"]
        async with httpx.AsyncClient() as client:
            assert (await client.post(service.http_url + HOOK_PATH, content=body)).status_code == 401
            r = await client.post(hook, content=body)  # the token alone: refused
            assert r.status_code == 401 and "webhook-id" in r.json()["detail"]
            forged = webhook_signature.sign(new_webhook_secret(), "m1", None, body)
            assert (await client.post(hook, content=body, headers=forged)).status_code == 401
            r = await client.post(hook, content=body, headers=webhook_signature.sign(own, "m1", None, body))
            assert r.status_code == 200, r.text
        assert (await router.store.counters())["ingested"] == 1
    async with RouterService(settings) as again:
        assert again.results.webhook_secret == own


def test_the_callback_is_spliced_into_the_body_byte_for_byte():
    from pipelines.predictions_results import PredictionResults

    results = PredictionResults.__new__(PredictionResults)
    results.callback_url, results.webhook_secret = "http://r/v1/hooks/predictions", "whsec_x"
    results.token_ttl = 3600
    import os as _os
    results._fallback_key = _os.urandom(32)
    for body in ({"version": "v", "input": {"image": "data:image/png;base64,AAAA"}}, {}):
        msg = Message.new(device_id="d", path="/images", content_type="application/json",
                          payload=json.dumps(body).encode())
        out = results.add_callback(msg, "https://api.replicate.com/v1/predictions")
        doc = json.loads(out.payload)
        assert {k: v for k, v in doc.items() if not k.startswith("webhook")} == body
        assert doc["webhook_events_filter"] == ["completed"]
        assert results.read_token(doc["webhook"].split("?c=")[1])["message_id"] == msg.id
