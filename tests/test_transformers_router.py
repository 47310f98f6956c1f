"""Golioth documentation pipelines, loaded from YAML and run by the real Router, delivering to
a real HTTP server: the transformers as users meet them."""

from __future__ import annotations

import json
import struct
import textwrap

import pytest

from pipelines.message import Message
from pipelines.router import Router, RouterSettings

try:
    from tests.http_recorder import HTTPRecorder, Reply
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder, Reply

PIPELINES = """
pipelines:
  conditional-json-patch:          # Golioth "Conditional JSON Patch", lightdb-stream -> webhook
    filter: {path: "/env", content_type: application/json}
    steps:
      - name: get-metadata
        transformer: {type: inject-metadata, version: v1}
      - name: conditional-patch
        transformer:
          type: json-patch
          version: v1
          parameters:
            patch: |
              [
                {"op": "test", "path": "/device_id", "value": "649998262fecb43eb2d39859"},
                {"op": "add", "path": "/demo", "value": true}
              ]
      - name: remove-metadata
        transformer:
          type: json-patch
          version: v1
          parameters:
            patch: |
              [
                {"op": "remove", "path": "/device_id"},
                {"op": "remove", "path": "/project_id"},
                {"op": "remove", "path": "/timestamp"}
              ]
      - name: send
        destination: {type: webhook, version: v1, parameters: {url: "BASE/env"}}

  struct:
    filter: {path: "/struct", content_type: application/octet-stream}
    steps:
      - name: decode
        transformer:
          type: struct-to-json
          version: v1
          parameters:
            members:
              - {name: temperature, type: float}
              - {name: string1, type: string, length: 5}
              - {name: string2_len, type: u8}
              - {name: string2, type: string, lengthField: string2_len}
      - name: nest
        transformer: {type: inject-path}
      - name: send
        destination: {type: webhook, parameters: {url: "BASE/struct", headers: {X-Step: decode}}}

  cbor-webhook:
    filter: {path: "/temp", content_type: application/cbor}
    steps:
      - name: json
        transformer: {type: cbor-to-json}
      - name: time
        transformer: {type: extract-timestamp}
      - name: c-to-f
        transformer: {type: webhook, parameters: {url: "BASE/c2f", embed: true}}
      - name: send
        destination: {type: webhook, parameters: {url: "BASE/out"}}
"""


@pytest.fixture
def server():
    with HTTPRecorder(default=Reply(200)) as srv:
        srv.routes["/c2f"] = Reply(200, {"Content-Type": "application/json"}, b'{"temp": 89.6}')
        yield srv


async def test_golioth_pipelines_through_the_router(tmp_path, server):
    import cbor2

    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(PIPELINES).replace("BASE", server.url("")))
    settings = RouterSettings(pipelines=[path], store_path=tmp_path / "s.db")
    async with Router(settings) as router:
        for device in ("649998262fecb43eb2d39859", "other-device"):
            await router.accept(Message.new(device_id=device, project_id="p", path="/env",
                                            content_type="application/json", payload=b'{"temp": 21}'))
        await router.accept(Message.new(
            device_id="d1", path="/struct", content_type="application/octet-stream",
            payload=struct.pack("<f", 23.5) + b"hello" + b"\x08Golioth!"))
        await router.accept(Message.new(device_id="d2", path="/temp", content_type="application/cbor",
                                        payload=cbor2.dumps({"temp": 32, "ts": 1626362266059})))
        requests = await server.wait_for(5)
    by_path: dict[str, list] = {}
    for r in requests:
        by_path.setdefault(r.path, []).append(r)

    env = {r.headers["Ce-Source"]: json.loads(r.body) for r in by_path["/env"]}
    assert env == {"649998262fecb43eb2d39859": {"data": {"temp": 21}, "demo": True},
                   "other-device": {"data": {"temp": 21}}}

    [s] = by_path["/struct"]
    assert s.headers["X-Step"] == "decode" and s.headers["Content-Type"] == "application/json"
    assert json.loads(s.body) == {"struct": {"temperature": 23.5, "string1": "hello", "string2_len": 8,
                                             "string2": "Golioth!"}}

    [c2f] = by_path["/c2f"]
    assert json.loads(c2f.body) == {"temp": 32} and c2f.headers["Ce-Type"] == "io.golioth.data.v1/.s/temp"
    [out] = by_path["/out"]
    assert json.loads(out.body) == {"input": {"temp": 32}, "output": {"temp": 89.6}}
    assert out.headers["Ce-Time"] == "2021-07-15T15:17:46.059000Z"  # set by extract-timestamp
