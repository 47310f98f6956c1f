"""kill -9 at random moments while 2,000 frames stream in: nothing acknowledged is lost.

A real ``pipeline serve`` process (HTTP ingest on, durable store in tmp_path) delivers to a
real HTTP sink. Clients POST frames with their own ``Message-Id`` and retry until they get
``202``; three times, at random points of the stream, the router gets SIGKILL and is started
again on the same store. In the end every acknowledged frame reached the sink at least once,
every duplicate is the same frame under the same id, and the books balance.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import httpx
from delivery_sink import Sink
from test_delivery_faults import write_pipelines

from pipelines.store import Store, books_gaps
from tests.serve_process import KillableServe

FRAMES = 2000
KILLS = 3


def payload(i: int) -> bytes:
    return (f"frame {i:05d} ".encode() * 40)[:512]


class RouterProcess(KillableServe):
    stop_timeout = 15

    def __init__(self, tmp: Path, pipelines: Path) -> None:
        super().__init__([sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(pipelines),
                          "--store", str(tmp / "store.db"), "--http-port", "0", "--http-ingest"],
                         tmp / "router.log")
        self.url = ""

    async def start(self) -> None:
        line = await self.launch(20)
        assert line.startswith("ready http://"), f"router did not start: {line!r}; see {self.log}"
        self.url = line.split()[1]
        self.starts += 1

    async def kill9(self) -> None:
        await super().kill9()
        self.url = ""


async def test_sigkill_while_streaming_loses_no_acknowledged_frame(tmp_path: Path) -> None:
    rng = random.Random()
    with Sink() as sink:
        pf = write_pipelines(tmp_path, [{"name": "sink", "url": sink.url("/frames"), "max_in_flight": 16,
                                         "retry": {"initial_backoff": 0.05, "max_backoff": 0.3,
                                                   "max_attempts": 1000}}])
        router = RouterProcess(tmp_path, pf)
        await router.start()
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(FRAMES):
            todo.put_nowait(i)
        acked: set[str] = set()
        kill_at = sorted(rng.sample(range(150, FRAMES - 150), KILLS))
        kills_done = 0

        async def client(http: httpx.AsyncClient) -> None:
            while not todo.empty():
                i = todo.get_nowait()
                while True:  # like a device: the same frame again until it is acknowledged
                    url = router.url
                    if url:
                        try:
                            r = await http.post(f"{url}/v1/ingest/demo/cam-{i % 7}/frames",
                                                content=payload(i),
                                                headers={"Message-Id": f"frame-{i:05d}",
                                                         "Content-Type": "application/octet-stream"})
                            if r.status_code == 202:
                                assert r.json()["id"] == f"frame-{i:05d}"
                                acked.add(f"frame-{i:05d}")
                                break
                        except httpx.TransportError:
                            pass
                    await asyncio.sleep(0.02)

        async def killer() -> None:
            nonlocal kills_done
            for threshold in kill_at:
                while len(acked) < threshold:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(rng.uniform(0, 0.05))
                await router.kill9()
                kills_done += 1
                t = time.monotonic()
                await router.start()
                print(f"kill at {len(acked)} acked, {time.monotonic() - t0:.1f} s; "
                      f"restart took {time.monotonic() - t:.1f} s")

        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as http:
            await asyncio.gather(killer(), *(client(http) for _ in range(8)))
        print(f"all acked at {time.monotonic() - t0:.1f} s")
        assert kills_done == KILLS and router.starts == KILLS + 1
        assert len(acked) == FRAMES

        deadline = time.monotonic() + 30
        while not acked <= set(sink.ids("/frames")):
            missing = len(acked - set(sink.ids("/frames")))
            assert time.monotonic() < deadline, f"{missing} frames never arrived"
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        assert await router.terminate() == 0

        got = sink.got("/frames")
        ids = [g.ce_id for g in got]
        duplicates = len(ids) - len(set(ids))
        for g in got:  # a duplicate is the same frame under the same id, never another frame
            assert g.body == payload(int(g.ce_id.split("-")[1]))
        print(f"\n{FRAMES} frames, {KILLS} SIGKILLs, {duplicates} duplicate deliveries, {elapsed:.1f} s")

        async with Store(tmp_path / "store.db") as store:
            books = await store.counters()
        assert not any(books_gaps(books).values()), books
        assert books["inbox"] == 0 and books["deliveries_queued"] == 0 and books["deliveries_dead"] == 0
        assert books["deliveries_delivered"] >= FRAMES
