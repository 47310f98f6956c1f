"""The device simulator against a small aiocoap server standing in for the router's CoAP face.

The simulator's contract is the wire protocol (devices spec): POST ``/.s/<path>`` answered 2.04
with the message id as payload, and an observable ``/.d/result`` per device. This stand-in keeps
every upload, the Block1 options it saw, and writes a result document for each frame after
``answer_delay`` seconds. The end-to-end test against the real router lives elsewhere.

    async with StandInRouter(port, psks={"cam-01@demo": b"key"}) as router:   # coaps on port
        ...
    router.uploads[0].payload, router.blocks, router.set_result("cam-01", {...})
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiocoap
import aiocoap.resource as resource
import pytest
import yaml
from aiocoap import Code, Message

from device_sim import Camera, CameraConfig, Fleet, fleet_identities
from pipelines.commands import sim
from pipelines.devices import DeviceEntry, DeviceRegistry
from pipelines.ingest.dtls_server import add_dtls_server, device_from_claims


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Upload:
    device_id: str
    path: str
    payload: bytes
    content_format: int | None
    message_id: str


class _RecordingSite(resource.Site):
    def __init__(self, router: StandInRouter) -> None:
        super().__init__()
        self._router = router

    async def render_to_pipe(self, pipe):  # sees every block before reassembly
        self._router.token_lengths.add(len(pipe.request.token))
        block1 = pipe.request.opt.block1
        if block1 is not None:
            self._router.blocks.append(
                (block1.block_number, block1.more, block1.size, len(pipe.request.payload)))
        return await super().render_to_pipe(pipe)


class _Stream(resource.Resource):
    def __init__(self, router: StandInRouter, path: str) -> None:
        super().__init__()
        self._router = router
        self._path = path

    async def render_post(self, request):
        router = self._router
        if router.reject is not None:
            code, max_age = router.reject
            return Message(code=code, max_age=max_age, payload=b"stand-in refuses")
        device_id = router.device_of(request)
        router.counter += 1
        message_id = f"{router.prefix}{router.counter:04d}"
        router.uploads.append(Upload(device_id, self._path, request.payload, request.opt.content_format,
                                     message_id))
        if router.answer:
            loop = asyncio.get_running_loop()
            loop.call_later(router.answer_delay, router.set_result, device_id, {
                "frame_id": message_id, "output": f"Caption: frame {router.counter} (95%)",
                "status": "succeeded"})
        return Message(code=Code.CHANGED, payload=message_id.encode())


class _State(resource.ObservableResource):
    def __init__(self, router: StandInRouter) -> None:
        super().__init__()
        self._router = router
        self._forgotten: set = set()

    def forget_observers(self) -> None:
        """Stop notifying current observers without telling them, as a restarted router would."""
        self._forgotten |= set(self._observations)

    def updated_state(self, response=None) -> None:
        for observation in list(self._observations):
            if observation not in self._forgotten:
                observation.trigger(response)

    async def render_get(self, request):
        document = self._router.results.get(self._router.device_of(request))
        if document is None:
            return Message(payload=b"{}", content_format=50)
        if isinstance(document, bytes):
            return Message(payload=document, content_format=50)
        return Message(payload=json.dumps(document).encode(), content_format=50)


class StandInRouter:
    def __init__(self, port: int, *, psks: dict[str, bytes] | None = None, answer: bool = True,
                 answer_delay: float = 0.05, prefix: str = "msg-") -> None:
        self.port = port
        self.prefix = prefix  # of message ids; a "restarted" router gets another, ids stay unique
        self.psks = psks  # None: plain coap
        self.answer = answer
        self.answer_delay = answer_delay
        self.uploads: list[Upload] = []
        self.blocks: list[tuple[int, bool, int, int]] = []
        self.token_lengths: set[int] = set()
        self.results: dict[str, dict | bytes] = {}
        self.reject: tuple[Code, int | None] | None = None  # answer every upload with this
        self.counter = 0
        self._context: aiocoap.Context | None = None
        self._state: _State | None = None

    def device_of(self, request) -> str:
        if self.psks is not None:
            entry = device_from_claims(request.remote)
            return entry.device_id if entry is not None else "?"
        return parse_qs("&".join(request.opt.uri_query)).get("d", ["?"])[0]

    def forget_observers(self) -> None:
        if self._state is not None:
            self._state.forget_observers()

    def set_result(self, device_id: str, document: dict | bytes) -> None:
        self.results[device_id] = document
        if self._state is not None:
            self._state.updated_state()

    async def start(self) -> StandInRouter:
        site = _RecordingSite(self)
        site.add_resource([".s", "images"], _Stream(self, "/images"))
        self._state = _State(self)
        site.add_resource([".d", "result"], self._state)
        if self.psks is None:
            self._context = await aiocoap.Context.create_server_context(
                site, bind=("127.0.0.1", self.port), transports=["udp6"])
        else:
            # The router's own DTLS transport, with a registry holding just these keys.
            registry = DeviceRegistry([DeviceEntry(*identity.split("@"), psk)
                                       for identity, psk in self.psks.items()])
            self._context = aiocoap.Context(serversite=site)
            await add_dtls_server(self._context, ("127.0.0.1", self.port), lambda: registry)
        return self

    async def stop(self) -> None:
        context, self._context = self._context, None
        self._state = None
        if context is not None:
            await context.shutdown()

    async def __aenter__(self) -> StandInRouter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---------------------------------------------------------------------------------------- tests


def fast_config(port: int, transport: str = "coaps", **overrides) -> CameraConfig:
    settings = dict(port=port, transport=transport, interval=0.1, jitter=0.1, request_timeout=1.5,
                    backoff_initial=0.1, backoff_max=0.3, keepalive=0)
    settings.update(overrides)
    return CameraConfig(**settings)


def psks_for(identities) -> dict[str, bytes]:
    return {identity.psk_identity.decode(): identity.psk_bytes for identity in identities}


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("answer_delay", [0.05, 0.0])
async def test_plain_coap_upload_reassembles_byte_identical(answer_delay):
    identity = fleet_identities(1, seed=5)[0]
    port = free_udp_port()
    events = []

    def broken_live_view(event):
        events.append(event)
        raise RuntimeError("a live view bug must not stop the camera")

    async with StandInRouter(port, answer_delay=answer_delay) as router:
        camera = Camera(identity, fast_config(port, "coap", block_size=256, image_format="jpeg",
                                              max_frames=2), on_event=broken_live_view)
        async with camera:
            assert await camera.wait_answered(2, timeout=10), camera.stats
        upload = router.uploads[-1]
        # The 2.04 payload is the router's message id; the camera keeps it for correlation.
        assert camera.stats.last_frame_id == upload.message_id == "msg-0002"
        assert upload.payload == camera.last_frame.payload
        assert upload.content_format == 22
        assert upload.device_id == "cam-01"  # named by ?d= on plain CoAP
        assert {size for _, _, size, _ in router.blocks} == {256}
        assert router.token_lengths == {8}  # like the Golioth SDK
        assert all(length == 256 for _, more, _, length in router.blocks if more)
    stats = camera.stats
    assert (stats.frames_sent, stats.frames_acked, stats.frames_answered, stats.errors) == (2, 2, 2, 0)
    assert stats.last_answer == "Caption: frame 2 (95%)" and stats.last_status == "succeeded"
    assert len(stats.latencies) == 2 and 0 < stats.last_latency < 5
    assert [e.kind for e in events if e.kind in ("acked", "answered")] == ["acked", "answered"] * 2 or (
        answer_delay == 0.0 and sorted(e.kind for e in events if e.kind in ("acked", "answered"))
        == ["acked", "acked", "answered", "answered"])


async def test_dtls_psk_fleet_uploads_and_observes_answers():
    identities = fleet_identities(3, seed=9)
    port = free_udp_port()
    async with StandInRouter(port, psks=psks_for(identities)) as router:
        fleet = Fleet(identities, fast_config(port, max_frames=2, keepalive=0.2), seed=9)
        async with fleet:
            for camera in fleet.cameras:
                assert await camera.wait_answered(2, timeout=15), (camera.device_id, camera.stats)
            # Idle now: each camera pings (empty CON) through its DTLS session and gets the RST.
            await wait_until(lambda: all(c.stats.keepalives >= 1 for c in fleet.cameras), 5, "pings")
        totals = fleet.totals()
    assert totals["frames_acked"] == totals["frames_answered"] == 6
    assert totals["errors"] == 0 and totals["latency_p50"] > 0
    # Each camera authenticated with its own identity cam-NN@<project> and got its own answers.
    assert sorted({u.device_id for u in router.uploads}) == ["cam-01", "cam-02", "cam-03"]
    for camera in fleet.cameras:
        mine = [u.message_id for u in router.uploads if u.device_id == camera.device_id]
        assert camera.stats.last_frame_id == mine[-1]
        assert [u.payload for u in router.uploads if u.device_id == camera.device_id][-1] == \
            camera.last_frame.payload
    assert {size for _, _, size, _ in router.blocks} == {1024}
    assert router.token_lengths == {8}


async def test_dtls_wrong_key_is_refused_and_camera_keeps_trying():
    identity = fleet_identities(1, seed=1)[0]
    port = free_udp_port()
    async with StandInRouter(port, psks={identity.psk_identity.decode(): b"not-the-right-key"}) as router:
        camera = Camera(identity, fast_config(port, request_timeout=0.5))
        async with camera:
            await wait_until(lambda: camera.stats.retries >= 2, 10, "two retries")
            assert camera.running
    assert router.uploads == []
    assert camera.stats.frames_acked == 0 and camera.stats.errors >= 2
    assert identity.psk not in (camera.stats.last_error or "")


async def test_router_down_then_up_camera_recovers():
    identities = fleet_identities(1, seed=2)
    identity = identities[0]
    port = free_udp_port()
    camera = Camera(identity, fast_config(port, request_timeout=0.5, interval=0.2))
    router = await StandInRouter(port, psks=psks_for(identities)).start()
    try:
        await camera.start()
        assert await camera.wait_answered(1, timeout=10), camera.stats
        await router.stop()
        await wait_until(lambda: camera.stats.errors >= 1, 10, "the camera to notice the outage")
        answered_before = camera.stats.frames_answered
        router = await StandInRouter(port, psks=psks_for(identities), prefix="restarted-").start()
        assert await camera.wait_answered(answered_before + 2, timeout=15), camera.stats
        assert camera.running and camera.stats.retries >= 1
        assert router.uploads and router.uploads[-1].device_id == "cam-01"
    finally:
        await camera.stop()
        await router.stop()


async def test_keepalive_pings_when_idle_and_notices_a_dead_router():
    identity = fleet_identities(1, seed=4)[0]
    port = free_udp_port()
    router = await StandInRouter(port).start()
    camera = Camera(identity, fast_config(port, "coap", keepalive=0.2, interval=30, max_frames=1))
    try:
        await camera.start()
        assert await camera.wait_answered(1, timeout=10)
        await wait_until(lambda: camera.stats.keepalives >= 2, 5, "two keep-alives")
        assert camera.stats.errors == 0  # each ping was answered (RST)
        await router.stop()
        await wait_until(lambda: camera.stats.errors >= 1, 10, "a failed keep-alive")
        assert camera.stats.last_error == "keep-alive got no answer"
    finally:
        await camera.stop()
        await router.stop()


async def test_refused_frame_is_dropped_and_overload_is_retried():
    identity = fleet_identities(1, seed=6)[0]
    port = free_udp_port()
    async with StandInRouter(port) as router:
        router.reject = (Code.REQUEST_ENTITY_TOO_LARGE, None)
        camera = Camera(identity, fast_config(port, "coap"))
        async with camera:
            await wait_until(lambda: camera.stats.frames_rejected >= 2, 10, "two refused frames")
            assert camera.stats.retries == 0  # 4.13 will not change by resending
            assert "4.13" in camera.stats.last_error
            router.reject = (Code.SERVICE_UNAVAILABLE, 0)  # overloaded: retry the same frame
            await wait_until(lambda: camera.stats.retries >= 2, 10, "retries on 5.03")
            sent = camera.stats.frames_sent
            router.reject = None
            assert await camera.wait_answered(1, timeout=10)
            assert camera.stats.frames_sent <= sent + 1  # the retried frame went through


async def test_unreadable_result_counts_as_error():
    identity = fleet_identities(1, seed=8)[0]
    port = free_udp_port()
    async with StandInRouter(port, answer=False) as router:
        router.results["cam-01"] = b"null"  # an empty state document (the first notification)
        camera = Camera(identity, fast_config(port, "coap", max_frames=1))
        async with camera:
            await wait_until(lambda: camera.stats.observing and camera.stats.frames_acked == 1, 10,
                             "observation and upload")
            assert camera.stats.errors == 0  # null means "no result yet", not an error
            router.set_result("cam-01", b"\xffnot json")
            await wait_until(lambda: camera.stats.errors == 1, 5, "the bad notification")
            router.set_result("cam-01", {"frame_id": router.uploads[0].message_id, "output": "ok"})
            assert await camera.wait_answered(1, timeout=5)
    assert camera.stats.last_answer == "ok" and camera.stats.last_status is None


# ------------------------------------------------------------------------------- pipeline sim


def sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline")
    sim.add_parser(parser.add_subparsers())
    return parser.parse_args(["sim", *argv])


def test_sim_command_runs_a_fleet_until_every_frame_is_answered(tmp_path, capsys):
    port = free_udp_port()
    loop = asyncio.new_event_loop()
    router = StandInRouter(port)
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(router.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        registry = tmp_path / "devices.yaml"
        args = sim_args("--devices", "2", "--seed", "3", "--transport", "coap", "--port", str(port),
                        "--interval", "0.1", "--frames", "2", "--duration", "20", "--registry", str(registry))
        assert args.func(args) == 0
    finally:
        asyncio.run_coroutine_threadsafe(router.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    out = capsys.readouterr().out
    assert "cam-02 frame 1" in out and "answered in" in out and "latency p50" in out
    assert len(router.uploads) == 4 and {u.device_id for u in router.uploads} == {"cam-01", "cam-02"}
    devices = yaml.safe_load(registry.read_text())["devices"]
    assert [d["id"] for d in devices] == ["cam-01", "cam-02"]


def test_sim_command_registry_only_and_bad_arguments(tmp_path, capsys):
    registry = tmp_path / "out.yaml"
    assert sim.run(sim_args("--devices", "3", "--seed", "1", "--project", "acme",
                            "--registry", str(registry), "--registry-only")) == 0
    document = yaml.safe_load(registry.read_text())
    assert document["project_id"] == "acme" and len(document["devices"]) == 3
    assert sim.run(sim_args("--registry-only")) == 2
    assert "--registry-only needs --registry" in capsys.readouterr().err
    assert sim.run(sim_args("--devices", "0")) == 2
    assert "device count must be 1..999" in capsys.readouterr().err
    assert sim.run(sim_args("--size", "320x8")) == 2
    assert "frame size 320x8 out of range" in capsys.readouterr().err


async def test_camera_observes_again_when_the_router_forgot_the_observation():
    identity = fleet_identities(1, seed=13)[0]
    port = free_udp_port()
    # Plain CoAP, and a router that silently lost its observers (as after a restart): uploads
    # still work, so only the missing answer tells the camera that its observation is gone.
    events = []
    camera = Camera(identity, fast_config(port, "coap", interval=1.0, jitter=0, answer_timeout=0.3),
                    on_event=events.append)
    async with StandInRouter(port) as router:
        async with camera:
            assert await camera.wait_answered(1, timeout=10)
            router.forget_observers()
            del events[:]
            assert await camera.wait_answered(2, timeout=10), camera.stats
        assert camera.stats.errors == 0 and camera.stats.retries == 0  # nothing failed on the wire
        assert camera.stats.last_frame_id == router.uploads[1].message_id
    # The answer came through a new observation, registered because the answer was overdue.
    steps = [(e.kind, e.detail) for e in events if e.kind in ("acked", "observing", "answered")]
    assert [kind for kind, _ in steps] == ["acked", "observing", "answered"]
    assert steps[1][1] == "established"
