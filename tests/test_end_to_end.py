"""Issue 4's end-to-end checks: simulated cameras over DTLS → router → a local HTTP
prediction target → back to each camera through Observe; and a router restart.

Everything is real and on loopback: the router with CoAP/DTLS ingest, device_sim cameras
with their own PSK identities, a starlette target behind uvicorn. The cameras' frame
renderer is wrapped only to remember the exact bytes each frame had.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from device_sim.camera import CameraConfig
from device_sim.fleet import Fleet
from device_sim.identity import fleet_identities, write_registry
from pipelines.http_face import bound_port, start_http, stop_http
from pipelines.ingest.coap import CoapSettings
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings

PIPELINE = """
pipelines:
  cameras:
    filter: {{path: /images}}
    steps:
      - name: png
        transformer: {{type: change-content-type, version: v1, parameters: {{content_type: image/png}}}}
      - name: url
        transformer: {{type: data-url, version: v1}}
      - name: embed
        transformer: {{type: embed-in-json, version: v1, parameters: {{key: image}}}}
      - name: predict
        transformer: {{type: webhook, version: v1, parameters: {{url: "{target}/predict"}}}}
      - name: to-device
        destination: {{type: lightdb-state, version: v1, parameters: {{path: /result}}}}
"""


class Target:
    """A prediction target: decodes the data URL, keeps the bytes, answers per frame."""

    def __init__(self) -> None:
        self.received: dict[str, bytes] = {}
        self.server = None

    async def predict(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        prefix = "data:image/png;base64,"
        assert body["image"].startswith(prefix)
        data = base64.b64decode(body["image"][len(prefix):])
        frame_id = request.headers["ce-id"]
        self.received[frame_id] = data
        return JSONResponse({"frame_id": frame_id, "status": "succeeded",
                             "output": f"Caption: {hashlib.sha256(data).hexdigest()[:12]}"})

    async def __aenter__(self) -> str:
        app = Starlette(routes=[Route("/predict", self.predict, methods=["POST"])])
        self.server = await start_http(app, "127.0.0.1", 0)
        return f"http://127.0.0.1:{bound_port(self.server)}"

    async def __aexit__(self, *exc: object) -> None:
        await stop_http(self.server)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_frames(fleet: Fleet) -> dict[tuple[str, int], bytes]:
    sent: dict[tuple[str, int], bytes] = {}
    for cam in fleet.cameras:
        real = cam.frames.render

        def render(index, when, _real=real, _dev=cam.device_id):
            frame = _real(index, when)
            sent[(_dev, index)] = frame.payload
            return frame
        cam.frames.render = render  # type: ignore[method-assign]
    return sent


async def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def service_settings(tmp_path: Path, target: str, registry: Path, dtls_port: int = 0) -> ServiceSettings:
    (tmp_path / "p.yaml").write_text(PIPELINE.format(target=target))
    return ServiceSettings(
        router=RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "store.db"),
        http_port=None,
        coap=CoapSettings(host="127.0.0.1", dtls_port=dtls_port, registry_path=registry))


async def test_two_cameras_over_dtls_frames_arrive_byte_identical_and_answers_come_back(tmp_path):
    identities = fleet_identities(2, seed=7, project_id="demo")
    registry = write_registry(tmp_path / "devices.yaml", identities)
    target = Target()
    async with target as target_url, RouterService(service_settings(tmp_path, target_url, registry)) as service:
        fleet = Fleet(identities, CameraConfig(host="127.0.0.1", port=service.coap_dtls_port,
                                               interval=0.3, max_frames=4), seed=7)
        sent = record_frames(fleet)
        events = []
        fleet.on_event = events.append
        async with fleet:
            await wait_until(lambda: fleet.totals()["frames_answered"] >= 8, 60, "8 answers")
        totals = fleet.totals()
    assert totals["frames_sent"] == 8 and totals["frames_acked"] == 8
    assert totals["frames_rejected"] == 0
    # every frame reached the target with exactly the bytes the camera rendered
    assert len(target.received) == 8
    acked = {}
    for cam in fleet.cameras:
        assert cam.stats.frames_answered == 4
        assert cam.stats.last_answer and cam.stats.last_answer.startswith("Caption: ")
        assert all(lat > 0 for lat in cam.stats.latencies)
    for (device, index), data in sent.items():
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        acked[hashlib.sha256(data).hexdigest()] = (device, index)
    assert {hashlib.sha256(d).hexdigest() for d in target.received.values()} == set(acked)


async def test_a_camera_carries_on_when_the_router_restarts(tmp_path):
    identities = fleet_identities(1, seed=3, project_id="demo")
    registry = write_registry(tmp_path / "devices.yaml", identities)
    port = free_udp_port()
    async with Target() as target_url:
        settings = service_settings(tmp_path, target_url, registry, dtls_port=port)
        service = await RouterService(settings).start()
        fleet = Fleet(identities, CameraConfig(host="127.0.0.1", port=service.coap_dtls_port,
                                               interval=0.3, backoff_max=1.0, request_timeout=5.0),
                      seed=3)
        cam = fleet.cameras[0]
        try:
            async with fleet:
                await wait_until(lambda: cam.stats.frames_answered >= 2, 30, "answers before the restart")
                await service.stop()
                await asyncio.sleep(1.0)
                before = cam.stats.frames_acked
                service = await RouterService(service_settings(tmp_path, target_url, registry,
                                                               dtls_port=port)).start()
                await wait_until(lambda: cam.stats.frames_acked >= before + 2, 60,
                                 "acknowledged frames after the restart")
                await wait_until(lambda: cam.stats.frames_answered >= 4, 30, "answers after the restart")
        finally:
            await service.stop()
    assert cam.stats.frames_rejected == 0
