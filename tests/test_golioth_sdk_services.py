"""OTA, settings and RPC with Golioth's own Firmware SDK (its Linux port) as the device, against
``pipeline serve`` over DTLS in a private network namespace; the operator is the ``pipeline`` CLI
on the store (see ``tests/golioth_sdk.py``).

``golioth_basics`` registers the setting ``LOOP_DELAY_S`` (int) and the RPC ``multiply`` (two
floats -> ``{"value": a*b}``). The HIL ``ota`` program (``tests/hil/tests/ota/test.c``) runs
a resumable download of package ``walrus`` with its own sha256 check, and the manifest and
report tests of ``test_ota.py``. (``golioth_basics``' own OTA sends every block's log line to
``/.s/logs``; at the router's default 20 requests/s those are answered 4.29, each 4.29 is
logged and sent again, the SDK's 20-entry request queue fills and the download stalls 15 s
every ~40 blocks: so the download is shown with the HIL program, whose cloud logging is off.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re

import pytest
from golioth_sdk import SdkRouter, pipeline
from pipeline_texts import RPC_RESULTS

pytestmark = pytest.mark.timeout(600)

SEED = 20261204
DEVICE = "sdk-dev-1"  # registered with ``pipeline devices add`` (its generated key)
PIPELINES = RPC_RESULTS


def cli_json(*args: str) -> object:
    out = pipeline(*args)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


async def eventually(check, timeout: float, what: str):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


async def test_settings_and_rpc_reach_the_sdk_and_come_back(golioth_sdk, tmp_path):
    print(f"seed {SEED}")
    router = SdkRouter(tmp_path, PIPELINES)
    psk = router.add_device(DEVICE)
    await router.start()
    store = str(router.store)
    try:
        async with await router.run(golioth_sdk.program("golioth_basics"), DEVICE, psk) as device:
            await device.wait_for("Golioth client connected", 30)
            mark = len(device.lines)
            # a setting changed with the CLI reaches the device ...
            out = pipeline("settings", "set", "LOOP_DELAY_S", "3", "--device", DEVICE, "--store", store)
            assert out.returncode == 0, out.stderr
            await device.wait_for(r"Setting loop delay to 3 s", 20, mark)

            # ... and its answer comes back: accepted, for the version it was sent
            def answered():
                doc = cli_json("settings", "list", "--device", DEVICE, "--json", "--store", store)
                st = doc["status"]
                return st if st and st["version"] == doc["document"]["version"] else None
            status = await eventually(answered, 20, "the device's settings status")
            assert status["accepted"], status
            # a key the firmware does not know: the SDK answers with an error for that key
            out = pipeline("settings", "set", "NOT_IN_FIRMWARE", "7", "--store", store)
            assert out.returncode == 0, out.stderr
            status = await eventually(answered, 20, "the status after an unknown key")
            assert status["errors"] == [{"key": "NOT_IN_FIRMWARE", "code": 1, "error": "key not recognized"}]

            # an RPC made with the CLI returns the device's answer
            out = await asyncio.to_thread(pipeline, "rpc", DEVICE, "multiply", "3.0", "4.5", "--timeout", "15s",
                                          "--store", store)
            assert out.returncode == 0, out.stderr + device.tail()
            assert json.loads(out.stdout) == {"statusCode": 0, "status": "OK", "detail": {"value": 13.5}}
            out = await asyncio.to_thread(pipeline, "rpc", DEVICE, "self_destruct", "--store", store)
            assert out.returncode == 1 and json.loads(out.stdout)["status"] == "NOT_FOUND"
    finally:
        await router.stop()


async def test_hil_ota_resumes_across_a_router_restart_and_verifies_the_hash(golioth_sdk, tmp_path):
    """The SDK's HIL ``ota`` program (cloud logging off, so nothing competes with the download):
    a release of package ``walrus`` alone starts its resumable download test; the router is
    restarted part way; the SDK resumes at the block it had reached and checks the sha256. Then
    the manifest tests of ``tests/hil/tests/ota/test_ota.py``: main 1.2.2 (decoding), main 1.2.5
    with walrus (two components; GET and blockwise GET of the manifest hash the same as the
    notification), main 1.2.4 (ten state/reason reports, kept and shown by ``pipeline ota status``)."""
    program = golioth_sdk.program("hil-ota")
    rng = random.Random(SEED)
    walrus = rng.randbytes(2 << 20)  # 2048 blocks
    router = SdkRouter(tmp_path, PIPELINES)
    psk = router.add_device(DEVICE)
    await router.start()
    store = str(router.store)
    try:
        def upload(package: str, version: str, data: bytes) -> None:
            path = tmp_path / f"{package}-{version}.bin"
            path.write_bytes(data)
            out = pipeline("ota", "upload", str(path), "--package", package, "--version", version, "--store", store)
            assert out.returncode == 0 and hashlib.sha256(data).hexdigest() in out.stdout, out.stderr

        def release(package: str, version: str) -> None:
            out = pipeline("ota", "release", "--package", package, "--version", version, "--devices", DEVICE,
                           "--store", store)
            assert out.returncode == 0, out.stderr

        upload("walrus", "0.4.2", walrus)
        mains = {v: rng.randbytes(3000 + i) for i, v in enumerate(("1.2.2", "1.2.4", "1.2.5"))}
        for version, data in mains.items():
            upload("main", version, data)
        async with await router.run(program, DEVICE, psk) as device:
            await device.wait_for("Golioth CoAP client connected", 30)
            release("walrus", "0.4.2")
            start = await device.wait_for("Start resumable blockwise download test", 30)
            # the test's own simulated failure at block 2, then a resume from block 2
            await device.wait_for("Block download failed", 20, start)
            await device.wait_for(r"Downloaded block: 300\b", 60, start)
            await router.restart(kill=True)  # at once: the device's next block request goes unanswered
            restarted = len(device.lines)
            failed = await device.wait_for("Block download failed", 120, restarted)
            resume = await device.wait_for(r"Starting block download from (\d+)", 30, failed)
            resumed_at = int(re.search(r"from (\d+)", device.lines[resume]).group(1))
            assert 300 <= resumed_at < 2048, device.lines[resume]
            first_after = await device.wait_for(r"Downloaded block: \d+", 60, resume)
            assert device.lines[first_after].endswith(f"Downloaded block: {resumed_at}")  # not from 0
            ok = await device.wait_for("SHA256 matches as expected", 120, first_after)
            await device.wait_for("Block download successful", 10, ok)
            assert not any("SHA256 doesn't match" in line for line in device.lines)

            # manifest decoding (main 1.2.2, walrus alongside)
            release("main", "1.2.2")
            at = await device.wait_for("Found main component", 30, ok)
            await device.wait_for("No absent component found", 5, at)
            await device.wait_for("component.version: 1.2.2", 5, at)
            await device.wait_for(f"component.size: {len(mains['1.2.2'])}", 5, at)
            await device.wait_for(f"component.hash: {hashlib.sha256(mains['1.2.2']).hexdigest()}", 5, at)
            # two components; the manifest fetched with GET and blockwise GET is the notified one
            release("main", "1.2.5")
            at = await device.wait_for("Found walrus component", 30, at)
            await device.wait_for("component.package: walrus", 5, at)
            await device.wait_for(f"component.size: {len(walrus)}", 5, at)
            await device.wait_for("Manifest get SHA matches stored SHA", 30, at)
            await device.wait_for("Manifest blockwise SHA matches stored SHA", 30, at)
            # ten progress reports, as the HIL test checks them in Golioth's event log
            release("main", "1.2.4")
            at = await device.wait_for("golioth_ota_get_state: 1", 60, at)
            await device.wait_for("GOLIOTH_ERR_NULL: 5", 10, at)
            out = pipeline("ota", "status", "--device", DEVICE, "--history", "--json", "--store", store)
            reports = [json.loads(line) for line in out.stdout.splitlines()]
            reports = [r for r in reports if r["package"] == "main"][-10:]
            states = ["IDLE", "DOWNLOADING", "DOWNLOADED", "UPDATING"]
            assert [(r["state"], r["version"], r["target"]) for r in reports] == \
                [(states[i % 4], "2.3.4", "5.6.7") for i in range(10)]
            assert [r["reason"] for r in reports][:2] == ["READY", "FIRMWARE_UPDATED_SUCCESSFULLY"]
    finally:
        await router.stop()


async def test_hil_settings_types_ranges_and_errors(golioth_sdk, tmp_path):
    """The SDK's HIL ``settings`` program (``tests/hil/tests/settings``): its int, ranged int,
    bool, float and string settings, set for all devices and then per device with the CLI; the
    device's answers carry its errors per key, as ``test_settings.py`` checks them."""
    program = golioth_sdk.program("hil-settings")
    router = SdkRouter(tmp_path, PIPELINES)
    psk = router.add_device(DEVICE)
    await router.start()
    store = str(router.store)
    try:
        def cli_set(key: str, value: str, *extra: str) -> None:
            out = pipeline("settings", "set", key, value, *extra, "--store", store)
            assert out.returncode == 0, out.stderr

        for key, value, type_ in (("TEST_INT", "1", "int"), ("TEST_INT_RANGE", "1", "int"),
                                  ("TEST_BOOL", "false", "bool"), ("TEST_FLOAT", "1.23", "float"),
                                  ("TEST_STRING", "foo", "string"), ("TEST_NOT_REGISTERED", "27", "int"),
                                  ("TEST_WRONG_TYPE", "wrong", "string"), ("TEST_CANCEL", "false", "bool"),
                                  ("TEST_RESTART", "false", "bool")):
            cli_set(key, value, "--type", type_)

        def status_for_current():
            doc = cli_json("settings", "list", "--device", DEVICE, "--json", "--store", store)
            st = doc["status"]
            return {e["key"]: e["code"] for e in st["errors"]} if st and st["version"] == doc["document"]["version"] \
                else None

        async with await router.run(program, DEVICE, psk) as device:
            at = await device.wait_for("Settings registration complete", 60)
            errors = await eventually(status_for_current, 20, "the first settings status")
            assert errors == {"TEST_NOT_REGISTERED": 1, "TEST_WRONG_TYPE": 3}
            for key, value, line in (("TEST_INT", "42", "Received test_int: 42"),
                                     ("TEST_INT_RANGE", "100", "Received test_int_range: 100"),
                                     ("TEST_BOOL", "true", "Received test_bool: true"),
                                     ("TEST_FLOAT", "3.14", "Received test_float: 3.14"),
                                     ("TEST_FLOAT", "10", "Received test_float: 10"),
                                     ("TEST_STRING", "bar", "Received test_string: bar")):
                cli_set(key, value, "--device", DEVICE)
                at = await device.wait_for(line, 20, at)
                errors = await eventually(status_for_current, 20, f"the status after {key}={value}")
                assert errors == {"TEST_NOT_REGISTERED": 1, "TEST_WRONG_TYPE": 3}, key
            # out of the registered range (0..100): the SDK refuses it and says so for that key
            mark = len(device.lines)
            cli_set("TEST_INT_RANGE", "101", "--device", DEVICE)
            errors = await eventually(status_for_current, 20, "the status after an out-of-range value")
            assert errors == {"TEST_INT_RANGE": 4, "TEST_NOT_REGISTERED": 1, "TEST_WRONG_TYPE": 3}
            assert not any("Received test_int_range: 101" in line for line in device.lines[mark:])
            shown = pipeline("settings", "list", "--store", store).stdout
            assert "TEST_INT_RANGE: value outside range" in shown
            assert "TEST_WRONG_TYPE: value format not valid" in shown
    finally:
        await router.stop()


async def test_hil_rpc_answers_timeouts_and_reobservation(golioth_sdk, tmp_path):
    """The SDK's HIL ``rpc`` program (``tests/hil/tests/rpc``), called with ``pipeline rpc`` the
    way ``test_rpc.py`` calls Golioth's API: return types, argument counts, unknown methods, a
    malformed answer (a timeout), a device that reconnects, and one that stops observing."""
    program = golioth_sdk.program("hil-rpc")
    router = SdkRouter(tmp_path, PIPELINES)
    psk = router.add_device(DEVICE)
    await router.start()
    store = str(router.store)
    try:
        async def call(method: str, *params: str, timeout: str = "10s") -> tuple[int, dict | None, str]:
            out = await asyncio.to_thread(pipeline, "rpc", DEVICE, method, *params, "--timeout", timeout,
                                          "--store", store)
            return out.returncode, (json.loads(out.stdout) if out.stdout.strip() else None), out.stderr

        async with await router.run(program, DEVICE, psk) as device:
            at = await device.wait_for("RPC observation established", 60)
            rc, answer, _ = await call("not_registered")
            assert rc == 1 and answer["status"] == "NOT_FOUND"
            for params in ([], ["1"], [str(i) for i in range(9)]):
                rc, answer, err = await call("no_response", *params)
                assert rc == 0, err
                at = await device.wait_for(f"Received no_response with {len(params)} args", 10, at)
            for kind, value in (("int", 42), ("string", "foo"), ("float", 12.34), ("bool", True)):
                rc, answer, err = await call("basic_return_type", json.dumps(kind))
                assert rc == 0 and answer["detail"] == {"value": value}, (kind, answer, err)
            rc, answer, _ = await call("object_return_type")
            assert answer["detail"] == {"foo": {"bar": {"baz": 357}}}
            rc, answer, err = await call("malformed_response", timeout="3s")
            assert rc == 2 and "did not answer malformed_response within 3s" in err
            rc, answer, _ = await call("basic_return_type", '"foo"')
            assert rc == 1 and answer["status"] == "INVALID_ARGUMENT"
            for _ in range(2):  # the device restarts its client and observes again
                rc, answer, _ = await call("disconnect")
                assert rc == 0
                at = await device.wait_for("RPC observation established", 60, at + 1)
                rc, answer, _ = await call("basic_return_type", '"int"')
                assert rc == 0 and answer["detail"] == {"value": 42}
            rc, answer, _ = await call("cancel_all")
            assert rc == 0
            at = await device.wait_for("Observations cancelled", 15, at)
            rc, answer, err = await call("basic_return_type", '"int"', timeout="2s")
            assert rc == 2 and "did not answer basic_return_type within 2s" in err
            at = await device.wait_for("RPC observation established", 40, at)
            rc, answer, _ = await call("basic_return_type", '"int"')
            assert rc == 0 and answer["detail"] == {"value": 42}
    finally:
        await router.stop()
