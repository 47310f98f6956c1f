"""The predictions service's fast paths give exactly the answers of the plain ones.

Answers echo the input (a ~56 KB data URL per frame), so the service quotes input strings as they
came instead of re-encoding them when the request body proves they need no escaping; ids come from
base32 of os.urandom; data URLs decode in one strict pass with a tolerant fallback; the CLI runs on
uvloop with httptools. Everything here goes through the real service on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from predictions_service import Settings, blip, running
from predictions_service.ids import new_message_id, new_prediction_id
from predictions_service.records import Prediction
from predictions_service.runner import PredictionRunner

TOKEN = "r8_encoding_suite"
ROOT = Path(__file__).resolve().parent.parent


def png_bytes() -> bytes:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()
IMAGE = "data:image/png;base64," + base64.b64encode(PNG).decode()

INPUTS = [
    pytest.param({"image": IMAGE}, id="plain-data-url"),
    pytest.param(
        {"image": IMAGE, "task": "visual_question_answering", "question": 'is it a "cat" \\ or\na café ☕?'},
        id="escapes-and-unicode",
    ),
    pytest.param({"image": IMAGE, "extra": 1.5e-7, "flags": [True, None, {"a": "b"}]}, id="non-string-values"),
]


@pytest.mark.parametrize("inp", INPUTS)
async def test_answers_are_exactly_json_dumps_of_what_was_sent(classifier, inp):
    settings = Settings(port=0, tokens=(TOKEN,), log_level="warning")
    async with running(settings, PredictionRunner(settings, classifier=classifier)) as url:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            r = await client.post(
                "/v1/predictions", json={"version": blip.VERSION, "input": inp}, headers={"Prefer": "wait"}
            )
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "succeeded", r.json()["error"]
            assert r.json()["input"] == inp
            assert r.text == json.dumps(r.json())  # byte for byte what json.dumps writes
            created = await client.post("/v1/predictions", json={"version": blip.VERSION, "input": inp})
            assert created.json()["status"] == "starting"
            assert created.text == json.dumps(created.json())
            got = await client.get(f"/v1/predictions/{r.json()['id']}")
            assert got.text == json.dumps(got.json()) and got.json()["input"] == inp
            listed = await client.get("/v1/predictions")
            assert listed.text == json.dumps(listed.json())
            assert [p["id"] for p in listed.json()["results"]][-1] == r.json()["id"]
            assert all(p["input"] == inp for p in listed.json()["results"])


async def test_plain_encoding_of_a_record_matches_json_dumps_through_its_life():
    inp = {"image": IMAGE, "task": "x"}
    pred = Prediction(model="m", version="v", input=inp, base_url="http://h", input_plain=True)
    snapshot = pred.as_json()
    assert pred.encode(snapshot) == json.dumps(snapshot)
    pred.status, pred.started_at, pred.completed_at, pred.output = "succeeded", time.time(), time.time(), "Caption: a"
    assert pred.to_json() == json.dumps(pred.as_json())
    assert pred.to_json(status="starting") == json.dumps(pred.as_json(status="starting"))
    pred.input = {"image": IMAGE, "n": 3}  # not all strings: the plain quoting must not be used
    assert pred.to_json() == json.dumps(pred.as_json())
    pred.input, pred.data_removed = {}, True  # as the store's retention sweep leaves it
    assert pred.to_json() == json.dumps(pred.as_json())


async def test_line_wrapped_base64_still_decodes_and_bad_base64_fails(classifier):
    wrapped = "data:image/png;base64," + "\n".join(
        base64.b64encode(PNG).decode()[i : i + 76] for i in range(0, len(base64.b64encode(PNG)), 76)
    )
    settings = Settings(port=0, tokens=(TOKEN,), log_level="warning")
    async with running(settings, PredictionRunner(settings, classifier=classifier)) as url:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            good = await client.post(
                "/v1/predictions", json={"version": blip.VERSION, "input": {"image": IMAGE}}, headers={"Prefer": "wait"}
            )
            r = await client.post(
                "/v1/predictions",
                json={"version": blip.VERSION, "input": {"image": wrapped}},
                headers={"Prefer": "wait"},
            )
            assert r.json()["status"] == "succeeded", r.json()["error"]
            assert r.json()["output"] == good.json()["output"]
            bad = await client.post(
                "/v1/predictions",
                json={"version": blip.VERSION, "input": {"image": IMAGE[:-6] + "=A=B=="}},
                headers={"Prefer": "wait"},
            )
            assert bad.json()["status"] == "failed"
            assert "image: the data URL's base64 is invalid" in bad.json()["error"]


def test_ids_are_unique_and_in_the_crockford_alphabet():
    ids = [new_prediction_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-hjkmnp-tv-z]{26}", i) for i in ids)
    assert set("".join(ids)) == set("0123456789abcdefghjkmnpqrstvwxyz")  # every digit is used
    msg = new_message_id()
    assert re.fullmatch(r"msg_[0-9a-hjkmnp-tv-z]{24}", msg) and msg != new_message_id()


def test_cli_serves_on_uvloop_with_httptools(classifier, tmp_path):
    import httptools  # noqa: F401  (core dependencies: missing means a broken install)
    import uvloop  # noqa: F401
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREDICTIONS_API_TOKENS": TOKEN}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "predictions_service", "--port", str(port), "--log-level", "info",
             "--model-dir", str(classifier.path.parent)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            else:
                pytest.fail(f"service did not come up: {log.read_text()[-2000:]}")
        finally:
            proc.terminate()
            proc.wait(10)
    assert "(event loop: uvloop, HTTP parser: httptools)" in log.read_text()
