"""The default camera pipeline's transformer steps (Golioth's Replicate example) on a real PNG,
then delivered by the webhook destination to a real HTTP server."""

from __future__ import annotations

import base64
import io
import json

import httpx
from PIL import Image

from destinations.registry import registry as destinations
from pipelines.components import ComponentContext
from pipelines.message import Message
from transformers.registry import registry as transformers

try:
    from tests.http_recorder import HTTPRecorder
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder

VERSION = "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"
# research/golioth.md §5.1 (one line wrapped)
PATCH = """[
  {"op": "add", "path": "/version",
   "value": "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"},
  {"op": "add", "path": "/input", "value": {"image": ""}},
  {"op": "move", "from": "/image", "path": "/input/image"}
]
"""
STEPS = [
    ("change-content-type", {"content_type": "image/png"}),
    ("data-url", {}),
    ("embed-in-json", {"key": "image"}),
    ("json-patch", {"patch": PATCH}),
]


def png_bytes() -> bytes:
    image = Image.new("RGB", (32, 24))
    image.putdata([(x * 8, y * 10, (x * y) % 256) for y in range(24) for x in range(32)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build(kind_registry, type_: str, params: dict, context: ComponentContext):
    cls = kind_registry.resolve(type_, "v1")
    return cls(cls.Params.model_validate(params), context)


async def run_steps(message: Message) -> Message:
    for type_, params in STEPS:
        message = await build(transformers, type_, params, ComponentContext()).transform(message)
    return message


async def test_camera_steps_build_the_replicate_request_from_a_real_png():
    png = png_bytes()
    upload = Message.new(device_id="cam-1", project_id="demo", path="/images",
                         content_type="application/octet-stream", payload=png)
    out = await run_steps(upload)
    assert out.content_type == "application/json"
    body = json.loads(out.payload)
    assert list(body) == ["version", "input"] and body["version"] == VERSION
    assert list(body["input"]) == ["image"]
    prefix = "data:image/png;base64,"
    assert body["input"]["image"].startswith(prefix)
    decoded = base64.b64decode(body["input"]["image"][len(prefix):], validate=True)
    assert decoded == png
    assert Image.open(io.BytesIO(decoded)).size == (32, 24)
    assert upload.payload == png and upload.content_type == "application/octet-stream"


async def test_camera_request_delivered_by_the_webhook_destination():
    png = png_bytes()
    upload = Message.new(device_id="cam-1", project_id="demo", path="/images",
                         content_type="application/octet-stream", payload=png)
    out = await run_steps(upload)
    with HTTPRecorder() as server:
        async with httpx.AsyncClient() as client:
            context = ComponentContext(http=client, extra={
                "url_overrides": {"https://api.replicate.com": server.url()}})
            dest = build(destinations, "webhook",
                         {"url": "https://api.replicate.com/v1/predictions",
                          "headers": {"Authorization": "Bearer r8_test"}}, context)
            await dest.deliver(out)
        [req] = server.requests
    assert req.path == "/v1/predictions"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Authorization"] == "Bearer r8_test"
    assert req.headers["Ce-Type"] == "io.golioth.data.v1/.s/images"
    expected = ('{"version":"' + VERSION + '","input":{"image":"data:image/png;base64,'
                + base64.b64encode(png).decode() + '"}}').encode()
    assert req.body == expected
