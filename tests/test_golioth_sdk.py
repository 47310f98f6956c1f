"""Golioth's Firmware SDK (Linux port, unmodified) against ``pipeline serve``: issue 11.

``golioth_basics`` runs ``BASICS_SECONDS`` (60 s by default, to fit the suite's time budget;
``GOLIOTH_BASICS_SECONDS=120`` runs the issue's 2 minutes) on one DTLS session; its logs, state
and stream write are stored; the router's default rate limit refuses none of its requests.
The SDK's own HIL programs ``stream``, ``connection`` and ``lightdb`` meet what their
``tests/hil/tests/<name>/test_*.py`` check against Golioth's cloud, checked here through the
``pipeline`` CLI (the store) instead of Golioth's REST API; where those tests set state "from
the cloud", a plain-CoAP client writes the device's state document (``tests/netns_client.py``).

How the SDK is built and reaches the router: ``tests/golioth_sdk.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re

from golioth_sdk import PROJECT, SdkRouter, keepalives, rate_limited

BASICS_SECONDS = int(os.environ.get("GOLIOTH_BASICS_SECONDS", "60"))

BASICS_PIPELINES = """
pipelines:
  device-logs:                       # the SDK's automatic cloud logging: CBOR records on /.s/logs
    filter: {path: /logs, content_type: application/cbor}
    steps:
      - name: json
        transformer: {type: cbor-to-json, version: v1}
      - name: store
        destination: {type: logs, version: v1}
  stream-root:                       # golioth_stream_set(client, "/", ...)
    filter: {path: /, content_type: application/json}
    steps:
      - name: store
        destination: {type: lightdb-stream, version: v1}
"""

CONNECTED = "Golioth CoAP client connected"


async def test_golioth_basics_runs_on_one_session_with_its_data_stored(golioth_sdk, tmp_path):
    router = SdkRouter(tmp_path, BASICS_PIPELINES)
    key = router.add_device("basics-1")
    await router.start()
    try:
        device = await router.run(golioth_sdk.basics, "basics-1", key, hil=False)
        try:
            await device.wait_for(CONNECTED, 60)
            await device.wait_for(r"Callback got my_int = 42", 30)
            hellos = BASICS_SECONDS // 10  # the sample's loop: one "Sending hello! N" per 10 s
            await device.wait_for(rf"Sending hello! {hellos}$", BASICS_SECONDS + 30)
            # that line goes to the cloud too: wait for it to be stored before stopping the device
            await _wait(lambda: _has_log(router, f"Sending hello! {hellos}"), 20, "the last log record")
        finally:
            await device.stop()
        metrics = await router.metrics()
    finally:
        assert await router.stop() == 0
    print(device.tail(60))
    # one DTLS session all along: never re-established, never timed out
    assert device.count(r"Start CoAP session") == 1, device.tail()
    assert device.count(r"Ending session|Receive timeout|Failed to connect|NACK") == 0, device.tail()
    assert device.count(r"4\.29") == 0
    state = router.cli("state", "basics-1", "--project", PROJECT)
    assert state["my_int"] == 42 and state["counter"] >= hellos
    logs = router.cli("logs", "--limit", "1000")
    messages = {(r["device"], r["level"], r["module"], r["msg"]) for r in logs}
    assert ("basics-1", "info", "golioth_basics", "Hello, Golioth!") in messages
    assert ("basics-1", "info", "golioth_basics", f"Sending hello! {hellos}") in messages
    stream = router.cli("stream")
    assert [(r["device"], r["path"], r["data"]) for r in stream] == [("basics-1", "/", {"my_stream_int": 15})]
    # the default limits let all of the SDK's own traffic through
    assert "# TYPE pipeline_coap_rate_limited_total counter" in metrics
    assert rate_limited(metrics, "basics-1") == 0, [m for m in metrics.splitlines() if "rate_limited" in m]


def _has_log(router: SdkRouter, msg: str) -> bool:
    return any(r["msg"] == msg for r in router.cli("logs", "--limit", "50"))


async def _wait(check, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.5)


def _hash(doc: object) -> str:  # as tests/hil/tests/stream/test_stream.py
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


async def test_hil_stream_block_uploads_through_the_sdks_own_pipeline(golioth_sdk, tmp_path):
    hil = golioth_sdk.sdk / "tests" / "hil" / "tests" / "stream"
    pipeline_file = (hil / "pipelines" / "data_json.yaml").read_text()  # loaded unchanged
    router = SdkRouter(tmp_path, pipeline_file)
    key = router.add_device("stream-1")
    await router.start()
    try:
        device = await router.run(golioth_sdk.hil_stream, "stream-1", key, hil=True)
        try:
            await device.wait_for(CONNECTED, 120)
            await device.wait_for("All stream data has been sent", 60)
        finally:
            await device.stop()
    finally:
        assert await router.stop() == 0
    assert device.count("Block upload successful!") == 1 and device.count("Multi-block upload successful!") == 1
    assert device.count(r"4\.29|4\.09|4\.08") == 0, device.tail()
    expected = _hash(json.loads((hil / "test_data.json").read_text()))
    rows = router.cli("stream", "--device", "stream-1")
    by_path = {r["path"]: r["data"] for r in rows}
    for name in ("block_upload", "multi_upload"):  # inject-path nests the payload under the path
        assert _hash(by_path[f"/data/{name}"]["data"][name]) == expected, name


async def test_hil_connection_stays_up_while_idle(golioth_sdk, tmp_path):
    router = SdkRouter(tmp_path, BASICS_PIPELINES)
    key = router.add_device("conn-1")
    await router.start()
    try:
        device = await router.run(golioth_sdk.hil_connection, "conn-1", key, hil=True)
        try:
            i = await device.wait_for(CONNECTED, 120)
            i = await device.wait_for("Stopping client", 15, i)
            i = await device.wait_for("Starting client", 120, i)
            i = await device.wait_for(CONNECTED, 120, i)
            i = await device.wait_for("Destroying client", 15, i)
            i = await device.wait_for("Starting client", 120, i)
            idle_from = await device.wait_for(CONNECTED, 120, i)
            # then the program idles 60 s; as the HIL test, we watch that minute. The Linux
            # port's keep-alive is a path-less request every 9 s idle, which it waits for an
            # answer to ("Receive timeout" otherwise). The router counts those it answered:
            # one answered after the minute is the event that closes the watch. (The program
            # never exits by itself: the keep-alive timer's signal restarts its sleep.)
            before = keepalives(await router.metrics())
            await asyncio.sleep(61)
            during = keepalives(await router.metrics()) - before
            deadline = asyncio.get_running_loop().time() + 20
            while keepalives(await router.metrics()) - before <= during:
                assert asyncio.get_running_loop().time() < deadline, "no keep-alive after the idle minute"
                await asyncio.sleep(1)
        finally:
            await device.stop()
    finally:
        assert await router.stop() == 0
    idle = device.lines[idle_from:]
    print("\n".join(idle))
    assert not [line for line in idle if re.search(r"Receive timeout|Ending session|Start CoAP session", line)]
    assert during >= 6  # one every 9 s
    assert device.count(r"Start CoAP session") == 3  # one per start, none while idle


def _put(router: SdkRouter, device: str, path: str, value: object) -> dict:
    return {"coap": "PUT", "uri": f"coap://127.0.0.1:5683/.d/{path}?d={device}", "json": value}


async def _state(router: SdkRouter, device: str, path: str) -> object:
    return router.cli("state", device, "--project", PROJECT, "--path", "/" + path)


async def test_hil_lightdb_set_get_delete_observe(golioth_sdk, tmp_path):
    router = SdkRouter(tmp_path, BASICS_PIPELINES)
    dev = "lightdb-1"
    key = router.add_device(dev)
    await router.start()
    try:
        # what the HIL test's setup() writes through Golioth's API
        cloud = {"hil/lightdb/desired/true": True, "hil/lightdb/desired/false": False,
                 "hil/lightdb/desired/int": 13, "hil/lightdb/desired/float": -234.25,
                 "hil/lightdb/desired/str": "15", "hil/lightdb/desired/obj": {"c": "26", "d": -12},
                 "hil/lightdb/to_delete/true": True, "hil/lightdb/to_delete/false": False,
                 "hil/lightdb/to_delete/int": 14, "hil/lightdb/to_delete/str": "16",
                 "hil/lightdb/to_delete/obj": {"a": "16", "b": 12},
                 "hil/lightdb/observed/int": 0, "hil/lightdb/observed/cbor/int": 0,
                 "hil/lightdb/desired/ready": True}
        answers = await router.netns_client([_put(router, dev, p, v) for p, v in cloud.items()])
        assert {a["code"] for a in answers} == {"2.04"}, answers
        device = await router.run(golioth_sdk.hil_lightdb, dev, key, hil=True)
        try:
            await device.wait_for(CONNECTED, 120)
            await device.wait_for("LightDB State reported data is ready", 30)

            reported = {"true": True, "false": False, "int": 13, "float": -234.25, "str": "15",
                        "obj": {"c": "26", "d": -12}}
            for name, value in reported.items():  # test_lightdb_reported
                got = await _wait_state(router, dev, f"hil/lightdb/reported/{name}", lambda v, w=value: v == w)
                assert got == value and type(got) is type(value), (name, got)
            for name in ("true", "false", "int", "str", "obj"):  # test_lightdb_deleted
                assert await _state(router, dev, f"hil/lightdb/to_delete/{name}") is None, name

            events = 1  # test_lightdb_observed: ObserveTester
            for value, path in ((15, "hil/lightdb/observed/int"), (17, "hil/lightdb/observed/int"),
                                (19, "hil/lightdb/observed/cbor/int"), (21, "hil/lightdb/observed/cbor/int")):
                events += 1
                [a] = await router.netns_client([_put(router, dev, path, value)])
                assert a["code"] == "2.04", a
                await _wait_state(router, dev, "hil/lightdb/observed/events/count",
                                  lambda v, n=events: isinstance(v, int) and v >= n, timeout=10)
            assert await _state(router, dev, "hil/lightdb/observed/events/count") == 5
            got = [await _state(router, dev, f"hil/lightdb/observed/events/{i}") for i in range(6)]
            assert got == [0, 0, 15, 17, 19, 21]
        finally:
            await device.stop()
    finally:
        assert await router.stop() == 0
    assert device.count(r"4\.29|Failed to received observed int") == 0, device.tail()


async def _wait_state(router: SdkRouter, device: str, path: str, ok, timeout: float = 10) -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await _state(router, device, path)
        if ok(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.5)
