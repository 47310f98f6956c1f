"""kill -9 while cameras upload 20-60 KB frames in Block1 over CoAP: a 2.04 is never lost.

A real ``pipeline serve`` process (plain CoAP on a fixed port, durable store in tmp_path)
delivers to a real HTTP sink. Six aiocoap cameras upload random frames of 20 to 60 KB (Block1,
1 KB blocks); a camera whose upload fails (the router died under it: ICMP port unreachable,
4.08 for an upload the new process does not know) starts the frame again. Three times, at
random moments, the router gets SIGKILL and is started again on the same store and port. In
the end every frame that got its 2.04 reached the sink under the message id the 2.04 carried,
with the same sha256.

Both plain CoAP and CoAP over DTLS-PSK (the simulator's OpenSSL DTLS client, as a device runs
it): after a kill a DTLS camera's session is gone with the process, so a camera whose request
fails starts a new session (a new handshake) and the frame again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import sys
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code
from delivery_sink import Sink
from test_delivery_faults import write_pipelines

from tests.serve_process import KillableServe

CAMERAS = 6
FRAMES = 60
KILLS = 3


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CoapRouter(KillableServe):
    def __init__(self, tmp: Path, pipelines: Path, port: int, dtls: bool) -> None:
        args = [sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(pipelines),
                "--store", str(tmp / "store.db"), "--http-port", "0"]
        if dtls:
            registry = tmp / "devices.yaml"
            registry.write_text("project_id: demo\ndevices:\n" + "".join(
                f"  - id: cam-{n}\n    psk: {key_of(n).decode()}\n" for n in range(CAMERAS)))
            args += ["--coap-dtls-port", str(port), "--registry", str(registry)]
        else:
            args += ["--coap-port", str(port)]
        super().__init__(args, tmp / "router.log")

    async def start(self) -> None:
        line = await self.launch(30)
        assert "coap://" in line or "coaps://" in line, f"router did not start: {line!r}; see {self.log}"
        self.starts += 1


def key_of(n: int) -> bytes:
    return f"camera-{n}-key".encode()


async def client_context(n: int, dtls: bool) -> aiocoap.Context:
    if not dtls:
        return await aiocoap.Context.create_client_context()
    from device_sim.dtls_transport import dtls_client_context
    return await dtls_client_context(f"cam-{n}@demo".encode(), key_of(n))


@pytest.mark.parametrize("scheme", ["coap", "coaps"])
async def test_sigkill_during_block1_uploads_loses_no_acknowledged_frame(tmp_path: Path, scheme: str) -> None:
    dtls = scheme == "coaps"
    seed = int(os.environ.get("COAP_CRASH_SEED") or random.randrange(2 ** 32))
    print(f"\nCOAP_CRASH_SEED={seed}")
    rng = random.Random(seed)
    frames = [rng.randbytes(rng.randint(20_000, 60_000)) for _ in range(FRAMES)]
    port = free_udp_port()
    with Sink() as sink:
        pf = write_pipelines(tmp_path, [{"name": "sink", "url": sink.url("/frames"),
                                         "retry": {"initial_backoff": 0.05, "max_backoff": 0.3,
                                                   "max_attempts": 1000}}])
        router = CoapRouter(tmp_path, pf, port, dtls)
        await router.start()
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(FRAMES):
            todo.put_nowait(i)
        acked: dict[str, int] = {}  # message id from the 2.04 -> frame number
        attempts = 0
        kill_at = sorted(rng.sample(range(5, FRAMES - 10), KILLS))

        async def camera(n: int) -> None:
            nonlocal attempts
            ctx = await client_context(n, dtls)
            query = "" if dtls else f"?d=cam-{n}"
            try:
                while not todo.empty():
                    i = todo.get_nowait()
                    while True:  # like a device: the frame again until it is acknowledged
                        attempts += 1
                        req = aiocoap.Message(code=Code.POST, payload=frames[i], content_format=42,
                                              uri=f"{scheme}://127.0.0.1:{port}/.s/frames{query}")
                        try:
                            r = await asyncio.wait_for(ctx.request(req).response, 10)
                        except (aiocoap.error.Error, OSError, TimeoutError):
                            if dtls:  # the session died with the router: a new one, as a device does
                                with contextlib.suppress(Exception):
                                    await ctx.shutdown()
                                ctx = await client_context(n, dtls)
                            await asyncio.sleep(0.1)
                            continue
                        if r.code == Code.CHANGED:
                            acked[r.payload.decode()] = i
                            break
                        await asyncio.sleep(0.1)  # 4.08 after a restart, 5.03: start again
            finally:
                await ctx.shutdown()

        async def killer() -> None:
            for threshold in kill_at:
                while len(acked) < threshold:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(rng.uniform(0, 0.3))  # somewhere in the middle of uploads
                await router.kill9()
                t = time.monotonic()
                await router.start()
                print(f"kill at {len(acked)} acked; restart took {time.monotonic() - t:.1f} s")

        t0 = time.monotonic()
        await asyncio.gather(killer(), *(camera(n) for n in range(CAMERAS)))
        print(f"{FRAMES} frames acked in {time.monotonic() - t0:.1f} s, {attempts} attempts")
        assert router.starts == KILLS + 1 and len(set(acked.values())) == FRAMES

        deadline = time.monotonic() + 60
        while not set(acked) <= set(sink.ids("/frames")):
            assert time.monotonic() < deadline, f"{len(set(acked) - set(sink.ids('/frames')))} never arrived"
            await asyncio.sleep(0.05)
        assert await router.terminate() == 0
        got = {g.ce_id: g.body for g in sink.got("/frames")}
        for message_id, i in acked.items():
            assert hashlib.sha256(got[message_id]).hexdigest() == hashlib.sha256(frames[i]).hexdigest(), \
                f"frame {i} (message {message_id}) delivered with other bytes"
