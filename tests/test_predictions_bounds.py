"""The predictions service bounded (issue 14): inputs not kept in memory, URL inputs only from public
addresses unless allowed, bodies counted as they stream (chunked included).

Real servers on loopback: the service in-process (uvicorn) or as ``pipeline predictions serve`` in
its own process where its memory is the point (RSS read from ``/proc``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_predictions_api import TINY, TOKEN, ImageHost, png, serve_app, service

from predictions_service import blip

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VERSION = blip.VERSION


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- inputs not kept in memory --------------------------------------------------------------------
def test_rss_stays_bounded_over_100_creates_of_9_5_mb(classifier, tmp_path):
    seed = 1415
    print("seed", seed)
    rng = random.Random(seed)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
         "predictions", "serve", "--port", str(port), "--token", TOKEN,
         "--model-dir", str(classifier.path.parent), "--files-dir", str(tmp_path / "files"),
         "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "service did not come up"
                time.sleep(0.05)
            payload = rng.randbytes(7_100_000)  # 9.5 MB once base64-encoded
            body = json.dumps({"version": VERSION, "input": {
                "image": "data:application/octet-stream;base64," + base64.b64encode(payload).decode()}})
            assert 9_400_000 < len(body) < 9_700_000
            ids, samples = [], {}
            for i in range(100):
                r = client.post("/v1/predictions", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
                if i + 1 in (10, 100):
                    samples[i + 1] = rss_bytes(proc.pid)
            print({k: f"{v / 1e6:.0f} MB" for k, v in samples.items()})
            # before: every create kept its 9.5 MB (100 creates: 128 MB -> 2.4 GB)
            assert samples[100] - samples[10] < 150e6
            first = client.get(f"/v1/predictions/{ids[0]}").json()
            assert first["input"]["image"].startswith(f"{base}/v1/files/")  # the input, on disk
            assert first["status"] == "failed" and "cannot decode the image" in first["error"]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_inputs_of_finished_predictions_are_dropped_past_the_cap(classifier):
    big = "data:image/png;base64," + base64.b64encode(os.urandom(75_000)).decode()  # ~100 KB
    async with service(classifier, max_held_input_bytes=350_000, spill_input_bytes=1 << 30) as (api, _):
        ids = []
        for _ in range(5):
            r = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": big}},
                               headers={"Prefer": "wait"})
            ids.append(r.json()["id"])
        first = (await api.get(f"/v1/predictions/{ids[0]}")).json()
        last = (await api.get(f"/v1/predictions/{ids[-1]}")).json()
        assert first["input"]["image"] == f"<removed: {len(big)} characters>"
        assert last["input"]["image"] == big


async def test_creates_past_the_cap_with_nothing_finished_get_503(classifier):
    host = ImageHost()
    big = "data:image/png;base64," + base64.b64encode(os.urandom(75_000)).decode()
    async with serve_app(host.app) as url, service(
        classifier, max_held_input_bytes=350_000, spill_input_bytes=1 << 30, allow_private_urls=True
    ) as (api, _):
        # the one model slot waits on a stalled image, so the rest stay queued (held)
        await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": f"{url}/stall.png"}})
        statuses = []
        for _ in range(5):
            r = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": big}})
            statuses.append(r.status_code)
        host.release.set()
        assert statuses[:3] == [201, 201, 201] and statuses[3] == 503
        problem = r.json()
        assert problem["title"] == "Service Unavailable" and "hold" in problem["detail"]
        assert r.headers["retry-after"] == "1"


# -- URL inputs: public addresses only, unless allowed ---------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_loopback_urls_are_refused_by_default(classifier, host):
    images = ImageHost()
    async with serve_app(images.app) as url, service(classifier) as (api, _):
        port = url.rsplit(":", 1)[1]
        r = await api.post("/v1/predictions", headers={"Prefer": "wait"},
                           json={"version": VERSION, "input": {"image": f"http://{host}:{port}/coffee.png"}})
        pred = r.json()
        assert pred["status"] == "failed"
        assert "loopback, private or link-local" in pred["error"] and "--allow-private-urls" in pred["error"]


async def test_link_local_metadata_address_is_refused_without_connecting(classifier):
    async with service(classifier) as (api, _):
        started = time.monotonic()
        r = await api.post("/v1/predictions", headers={"Prefer": "wait"},
                           json={"version": VERSION, "input": {"image": "http://169.254.169.254/latest/meta-data"}})
        assert r.json()["status"] == "failed" and "169.254.169.254" in r.json()["error"]
        assert time.monotonic() - started < 5  # refused at the check: no connect timeout


async def test_private_urls_are_fetched_when_allowed(classifier):
    images = ImageHost()
    async with serve_app(images.app) as url, service(classifier, allow_private_urls=True) as (api, _):
        r = await api.post("/v1/predictions", headers={"Prefer": "wait"},
                           json={"version": VERSION, "input": {"image": f"{url}/coffee.png"}})
        assert r.json()["status"] == "succeeded" and "espresso" in r.json()["output"]


async def test_own_file_urls_are_read_without_fetching(classifier):
    """A file of this service is read from disk, so it works with private URLs refused."""
    async with service(classifier) as (api, _):
        from photos import photo

        data = png(photo("coffee"), (320, 240))
        made = (await api.post("/v1/files", files={"content": ("f.png", data, "image/png")})).json()
        r = await api.post("/v1/predictions", headers={"Prefer": "wait"},
                           json={"version": VERSION, "input": {"image": made["urls"]["get"]}})
        assert r.json()["status"] == "succeeded" and "espresso" in r.json()["output"]


# -- bodies counted as they stream ----------------------------------------------------------------
async def chunked_post(url: str, path: str, total: int, content_type: str, prefix: bytes = b"") -> tuple[int, bytes]:
    """POST ``total`` bytes with Transfer-Encoding: chunked (no Content-Length) over a raw socket;
    returns (status, body) of the answer, which may come before everything was sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    chunk = b"[" * 65536
    sent = 0
    try:
        if prefix:
            writer.write(b"%x\r\n%s\r\n" % (len(prefix), prefix))
        while sent < total:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass  # the service answered and closed before the end: read its answer
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    body = await reader.readexactly(length)
    writer.close()
    return status, body


async def test_chunked_body_over_the_cap_is_413(classifier):
    async with service(classifier, max_body_bytes=1_000_000) as (api, _):
        url = str(api.base_url).rstrip("/")
        status, body = await chunked_post(url, "/v1/predictions", 20_000_000, "application/json")
        assert status == 413 and json.loads(body)["title"] == "Request Entity Too Large"
        ok = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": TINY}})
        assert ok.status_code == 201  # the service lives on


async def test_chunked_upload_over_the_file_cap_is_413(classifier):
    async with service(classifier, max_file_bytes=500_000) as (api, _):
        url = str(api.base_url).rstrip("/")
        part = (b'--xyz\r\nContent-Disposition: form-data; name="content"; filename="big.bin"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        status, body = await chunked_post(url, "/v1/files", 20_000_000, "multipart/form-data; boundary=xyz", part)
        assert status == 413 and "Files must be less than 500000 bytes" in json.loads(body)["detail"]
        small = await api.post("/v1/files", files={"content": ("a.bin", b"abc", "application/octet-stream")})
        assert small.status_code == 201 and small.json()["size"] == 3


async def test_upload_over_the_file_cap_is_413_and_leaves_nothing(classifier):
    async with service(classifier, max_file_bytes=100_000) as (api, _):
        r = await api.post("/v1/files", files={"content": ("big.bin", os.urandom(200_000), "application/octet-stream")})
        assert r.status_code == 413 and r.json()["title"] == "Request Entity Too Large"
        assert (await api.get("/v1/files")).json()["results"] == []


@pytest.mark.parametrize(
    ("files", "data", "field"),
    [
        (None, {"metadata": "{}"}, "content"),
        ({"content": ("a.bin", b"abc")}, {"metadata": "{not json"}, "metadata"),
        ({"content": ("a.bin", b"abc")}, {"metadata": "[1]"}, "metadata"),
    ],
)
async def test_bad_uploads_are_422_naming_the_field(classifier, files, data, field):
    async with service(classifier) as (api, _):
        r = await api.post("/v1/files", files=files, data=data) if files else await api.post(
            "/v1/files", data=data, files={"other": ("x", b"1")})
        assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == field
