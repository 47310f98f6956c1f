"""Measure how bursty Golioth's Firmware SDK really is: the token bucket it needs.

Runs the SDK's Linux programs (``golioth_basics`` and the HIL ``lightdb`` flow, built as the
tests build them, ``tests/golioth_sdk.py``) against ``pipeline serve --rate-limit 0`` with
DEBUG logging, takes the arrival time of every request (not ACKs, not Block1 continuations,
which the limiter does not count either) and prints, for several sustained rates, the smallest
burst (bucket size) that would have refused none of them, plus the peak requests in any 1 s.
This is where ``pipelines.ingest.rate_limit.DEFAULT_RATE / DEFAULT_BURST`` come from::

    python bench/golioth_sdk_bursts.py                 # ~60 s
    python bench/golioth_sdk_bursts.py --seconds 60    # golioth_basics runs longer
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from golioth_sdk import SdkRouter, build_all

PIPELINES = """
pipelines:
  device-logs:
    filter: {path: /logs, content_type: application/cbor}
    steps:
      - name: json
        transformer: {type: cbor-to-json, version: v1}
      - name: store
        destination: {type: logs, version: v1}
"""
_REQUEST = re.compile(r"Incoming message <aiocoap.Message: (GET|POST|PUT|DELETE|FETCH) from ")


def arrivals(log: Path) -> list[float]:
    """Arrival times of the DTLS clients' requests (the SDK; plain-CoAP stand-ins for the cloud
    are left out). These programs send no Block1 uploads, so every request counts."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if _REQUEST.search(line) and "UDP6EndpointAddress" not in line:
            out.append(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def burst_needed(ts: list[float], rate: float) -> float:
    """Smallest bucket that lets every request through at ``rate``/s: max over windows of
    count - rate * duration."""
    best = 0.0
    for i in range(len(ts)):
        for j in range(i, len(ts)):
            best = max(best, (j - i + 1) - rate * (ts[j] - ts[i]))
    return best


def peak_per_second(ts: list[float]) -> int:
    j, best = 0, 0
    for i in range(len(ts)):
        while ts[i] - ts[j] > 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


async def run_basics(builds, tmp: Path, seconds: int) -> list[float]:
    router = SdkRouter(tmp, PIPELINES, "--rate-limit", "0", "--log-level", "DEBUG")
    key = router.add_device("basics-1")
    await router.start()
    device = await router.run(builds.basics, "basics-1", key, hil=False)
    try:
        await device.wait_for("Golioth CoAP client connected", 60)
        await asyncio.sleep(seconds)
    finally:
        await device.stop()
        await router.stop()
    return arrivals(router.log)


async def run_lightdb(builds, tmp: Path) -> list[float]:
    router = SdkRouter(tmp, PIPELINES, "--rate-limit", "0", "--log-level", "DEBUG")
    dev = "lightdb-1"
    key = router.add_device(dev)
    await router.start()

    def put(path, value):
        return {"coap": "PUT", "uri": f"coap://127.0.0.1:5683/.d/hil/lightdb/{path}?d={dev}", "json": value}

    await router.netns_client([put(f"desired/{k}", v) for k, v in
                               (("true", True), ("false", False), ("int", 13), ("float", -234.25),
                                ("str", "15"), ("obj", {"c": "26", "d": -12}))]
                              + [put(f"to_delete/{k}", v) for k, v in
                                 (("true", True), ("false", False), ("int", 14), ("str", "16"),
                                  ("obj", {"a": "16", "b": 12}))]
                              + [put("observed/int", 0), put("observed/cbor/int", 0), put("desired/ready", True)])
    device = await router.run(builds.hil_lightdb, dev, key, hil=True)
    try:
        await device.wait_for("LightDB State reported data is ready", 60)
        for value, path in ((15, "observed/int"), (17, "observed/int"), (19, "observed/cbor/int"),
                            (21, "observed/cbor/int")):
            await router.netns_client([put(path, value)])
            await asyncio.sleep(1.5)
    finally:
        await device.stop()
        await router.stop()
    return arrivals(router.log)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=25, help="golioth_basics run time after connecting")
    args = ap.parse_args()
    builds = build_all()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "b").mkdir()
        (Path(d) / "l").mkdir()
        runs = {"golioth_basics": await run_basics(builds, Path(d) / "b", args.seconds),
                "HIL lightdb": await run_lightdb(builds, Path(d) / "l")}
    rates = (5, 10, 20, 50)
    print(f"{'program':16} {'requests':>8} {'peak/1s':>8} " + " ".join(f"{f'burst@{r}/s':>11}" for r in rates))
    for name, ts in runs.items():
        print(f"{name:16} {len(ts):8d} {peak_per_second(ts):8d} "
              + " ".join(f"{burst_needed(ts, r):11.1f}" for r in rates))


if __name__ == "__main__":
    asyncio.run(main())
