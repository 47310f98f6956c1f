"""Remote settings (``/.c``) against the real Router and CoAP server, aiocoap clients on loopback,
``pipeline settings`` run as a real subprocess on the same store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code

from pipelines.device_services import settings as svc

try:
    from tests.test_device_ota import client, router, server, store_path, uri
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from test_device_ota import client, router, server, store_path, uri  # noqa: F401 - fixtures


def cli(*args: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "settings", *args, "--store", str(store)],
                          capture_output=True, text=True, timeout=60)


def observe(client, server, device: str, accept: int = 60):
    pr = client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.c", device), observe=0, accept=accept))
    return pr, pr.observation.__aiter__()


async def test_cli_change_reaches_observers_with_overrides(router, server, client, store_path):
    assert cli("set", "LOOP_DELAY_S", "10", store=store_path).returncode == 0
    pr1, it1 = observe(client, server, "cam-01")
    pr2, it2 = observe(client, server, "cam-02")
    first = cbor2.loads((await pr1.response).payload)
    assert first["settings"] == {"LOOP_DELAY_S": 10} and first["version"] >= 1
    assert cbor2.loads((await pr2.response).payload)["settings"] == {"LOOP_DELAY_S": 10}
    # an override for cam-01 only
    r = cli("set", "LOOP_DELAY_S", "3", "--device", "cam-01", store=store_path)
    assert r.returncode == 0, r.stderr
    note = cbor2.loads((await asyncio.wait_for(it1.__anext__(), 10)).payload)
    assert note["settings"] == {"LOOP_DELAY_S": 3} and note["version"] > first["version"]
    # a new setting for everyone: both hear of it; cam-02's first notification is this one,
    # which proves the override was never sent to it
    r = cli("set", "MODE", "eco", store=store_path)
    assert r.returncode == 0, r.stderr
    n1 = cbor2.loads((await asyncio.wait_for(it1.__anext__(), 10)).payload)
    n2 = cbor2.loads((await asyncio.wait_for(it2.__anext__(), 10)).payload)
    assert n1["settings"] == {"LOOP_DELAY_S": 3, "MODE": "eco"}
    assert n2["settings"] == {"LOOP_DELAY_S": 10, "MODE": "eco"}
    # types arrive as CBOR types the SDK decodes: float, bool
    assert cli("set", "GAIN", "1.5", store=store_path).returncode == 0
    assert cli("set", "LED", "true", "--project", "demo", store=store_path).returncode == 0
    for _ in range(3):
        n2 = cbor2.loads((await asyncio.wait_for(it2.__anext__(), 10)).payload)
        if n2["settings"].get("LED") is True:
            break
    assert n2["settings"] == {"GAIN": 1.5, "LED": True, "LOOP_DELAY_S": 10, "MODE": "eco"}
    pr1.observation.cancel()
    pr2.observation.cancel()


async def test_wrong_types_are_refused(router, store_path):
    await svc.set_setting(router.store, "LOOP_DELAY_S", "10")
    r = cli("set", "LOOP_DELAY_S", "soon", store=store_path)
    assert r.returncode == 2 and "not a whole number" in r.stderr
    r = cli("set", "LOOP_DELAY_S", "1.5", "--type", "float", "--device", "cam-01", store=store_path)
    assert r.returncode == 2 and "LOOP_DELAY_S is a int setting" in r.stderr
    r = cli("set", "NEW", "maybe", "--type", "bool", store=store_path)
    assert r.returncode == 2 and "not true or false" in r.stderr
    r = cli("set", "big", "1", store=store_path)
    assert r.returncode == 2 and "A-Z, 0-9" in r.stderr
    r = cli("set", "HUGE", str(1 << 40), "--type", "int", store=store_path)
    assert r.returncode == 2 and "32-bit" in r.stderr
    assert [row["value"] for row in await svc.all_settings(router.store)] == [10]  # nothing else stored


async def test_device_status_is_kept_and_shown(router, server, client, store_path):
    await svc.set_setting(router.store, "LOOP_DELAY_S", "10")
    await svc.set_setting(router.store, "NAME", "x")
    doc = cbor2.loads((await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.c"))).response).payload)

    async def post(body: bytes, device: str = "cam-01") -> aiocoap.Message:
        return await client.request(aiocoap.Message(code=Code.POST, uri=uri(server, "/.c/status", device),
                                                    payload=body, content_format=60)).response

    # cam-01 says NAME has the wrong type (the SDK's GOLIOTH_SETTINGS_VALUE_FORMAT_NOT_VALID = 3)
    r = await post(cbor2.dumps({"errors": [{"setting_key": "NAME", "error_code": 3}], "version": doc["version"]}))
    assert r.code == Code.CHANGED
    r = await post(cbor2.dumps({"version": doc["version"]}), device="cam-02")
    assert r.code == Code.CHANGED
    for bad in (b"\xff", cbor2.dumps([1]), cbor2.dumps({"version": "1"}),
                cbor2.dumps({"version": 1, "errors": [{"setting_key": 5, "error_code": 3}]})):
        r = await post(bad)
        assert r.code == Code.BAD_REQUEST and r.payload, bad
    out = cli("list", store=store_path)
    assert out.returncode == 0, out.stderr
    assert "cam-01 (demo) version" in out.stdout and "NAME: value format not valid" in out.stdout
    assert "cam-02 (demo) version" in out.stdout and "accepted" in out.stdout
    one = json.loads(cli("list", "--device", "cam-01", "--json", store=store_path).stdout)
    assert one["document"] == doc and one["status"]["errors"][0]["code"] == 3


async def test_json_accept_and_unknown_paths(router, server, client):
    await svc.set_setting(router.store, "LOOP_DELAY_S", "10")
    r = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.c"), accept=50)).response
    assert r.opt.content_format == 50 and json.loads(r.payload)["settings"] == {"LOOP_DELAY_S": 10}
    r = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.c"), accept=0)).response
    assert r.code == Code.NOT_ACCEPTABLE
    r = await client.request(aiocoap.Message(code=Code.GET, uri=uri(server, "/.c/other"))).response
    assert r.code == Code.NOT_FOUND


@pytest.mark.parametrize("text,type_,value", [("10", "int", 10), ("-3", "int", -3), ("2.5", "float", 2.5),
                                              ("true", "bool", True), ("off", "bool", False),
                                              ("hello", "string", "hello")])
def test_values_parse_by_type(text, type_, value):
    assert svc.guess_type(text) == type_ or type_ == "bool"
    assert svc.parse_value(text, type_) == value
