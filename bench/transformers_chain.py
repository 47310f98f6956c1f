"""Benchmark: the transformer steps of the default camera pipeline, and json-patch alone,
against a naive baseline measured in the same run.

* camera chain: change-content-type → data-url → embed-in-json → json-patch on a real PNG
  (Pillow, ~40 KB), then the bytes the webhook would send. Ours hands parsed JSON from step
  to step (``Message.evolve(json=...)``) and serialises once; the baseline parses and
  serialises at every JSON step and patches with the ``jsonpatch`` library.
* json-patch on a sensor document (inject-metadata output, 50 readings): our patcher vs
  ``jsonpatch.apply_patch`` (deep copy + apply), same operations.

Usage::

    python bench/transformers_chain.py            # prints a table
    python bench/transformers_chain.py --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonpatch
from PIL import Image

from pipelines.components import ComponentContext
from pipelines.message import Message
from transformers.registry import registry

PATCH = json.dumps([
    {"op": "add", "path": "/version",
     "value": "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"},
    {"op": "add", "path": "/input", "value": {"image": ""}},
    {"op": "move", "from": "/image", "path": "/input/image"},
])
SENSOR_PATCH = json.dumps([
    {"op": "test", "path": "/device_id", "value": "cam-1"},
    {"op": "add", "path": "/data/site", "value": "north"},
    {"op": "replace", "path": "/data/readings/0/v", "value": 0},
    {"op": "remove", "path": "/project_id"},
    {"op": "remove", "path": "/timestamp"},
])


def make(type_: str, params: dict | None = None):
    cls = registry.resolve(type_, "v1")
    return cls(cls.Params.model_validate(params or {}), ComponentContext())


def png(size: int = 160) -> bytes:
    image = Image.effect_noise((size, size), 60).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    frame = png()
    upload = Message.new(device_id="cam-1", path="/images", content_type="application/octet-stream",
                         payload=frame)
    steps = [make("change-content-type", {"content_type": "image/png"}), make("data-url"),
             make("embed-in-json", {"key": "image"}), make("json-patch", {"patch": PATCH})]

    async def ours_chain() -> bytes:
        m = upload
        for s in steps:
            m = await s.transform(m)
        return m.payload

    parsed_patch = jsonpatch.JsonPatch(json.loads(PATCH))

    def naive_chain() -> bytes:
        url = "data:image/png;base64," + base64.b64encode(upload.payload).decode()
        doc = json.loads(json.dumps({"image": url}))           # embed-in-json, then parsed by json-patch
        return json.dumps(parsed_patch.apply(doc), separators=(",", ":")).encode()

    assert json.loads(loop.run_until_complete(ours_chain())) == json.loads(naive_chain())

    sensor = {"data": {"readings": [{"t": i, "v": i * 0.5} for i in range(50)], "unit": "C"},
              "device_id": "cam-1", "project_id": "demo", "timestamp": {"seconds": 1, "nanos": 2}}
    sensor_msg = Message.new(device_id="cam-1", path="/s", content_type="application/json",
                             payload=json.dumps(sensor).encode())
    patcher = make("json-patch", {"patch": SENSOR_PATCH})
    lib_patch = jsonpatch.JsonPatch(json.loads(SENSOR_PATCH))
    doc = sensor_msg.json()
    assert loop.run_until_complete(patcher.transform(sensor_msg)).json() == lib_patch.apply(doc)

    rows = [
        (f"camera chain ({len(frame) // 1024} KB PNG)",
         rate(lambda: loop.run_until_complete(ours_chain()), args.seconds),
         rate(naive_chain, args.seconds)),
        ("json-patch, 5 ops, 50 readings",
         rate(lambda: loop.run_until_complete(patcher.transform(sensor_msg)), args.seconds),
         rate(lambda: lib_patch.apply(doc), args.seconds)),
    ]
    print(f"{'workload':34} {'ours /s':>12} {'baseline /s':>12} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:34} {ours:12,.0f} {base:12,.0f} {ours / base:6.2f}x")
    print("baseline: json.dumps/loads between steps + jsonpatch library (deep copy + apply)")
    loop.close()


if __name__ == "__main__":
    main()
