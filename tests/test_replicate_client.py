"""The official ``replicate`` client (1.0.7, pinned in the ``test`` extra) against a real
``pipeline predictions serve`` subprocess on loopback, used as people use it: ``run`` with an open
file (uploaded through the Files API), ``model=`` and ``owner/name:version`` references, the Files
API itself, every webhook option checked with the client's own ``webhooks.validate``, streaming,
and the models endpoints.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from photos import photo
from PIL import Image
from replicate import Client  # the official client: the test extra pins replicate==1.0.7
from replicate.exceptions import ReplicateError

from predictions_service import blip
from tests.serve_process import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_client_test"
VERSION = blip.VERSION
REF = f"salesforce/blip:{VERSION}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(classifier, tmp_path_factory):
    """``pipeline predictions serve`` in its own process; yields its base URL."""
    port = free_port()
    work = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
         "predictions", "serve", "--port", str(port), "--token", TOKEN,
         "--model-dir", str(classifier.path.parent), "--files-dir", str(work / "files"),
         "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, 30)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        assert b"Traceback" not in proc.stderr.read()


@pytest.fixture
def client(server) -> Client:
    return Client(api_token=TOKEN, base_url=server)


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frame.png"
    img = Image.fromarray(photo("coffee"))
    img.thumbnail((320, 240))
    img.save(path, "PNG")
    return path


# -- run with an open file ------------------------------------------------------------------------
def test_run_with_an_open_file_uploads_it_and_captions_it(client, frame):
    before = {f.id for f in client.files.list()}
    with frame.open("rb") as fh:
        output = client.run(REF, input={"image": fh})
    assert output.startswith("Caption: espresso")
    uploaded = [f for f in client.files.list() if f.id not in before]
    assert [f.name for f in uploaded] == ["frame.png"]  # went through POST /v1/files, not inline
    assert uploaded[0].size == frame.stat().st_size and uploaded[0].content_type == "image/png"


async def test_async_run_with_an_open_file(client, frame):
    with frame.open("rb") as fh:
        output = await client.async_run(REF, input={"image": fh})
    assert output.startswith("Caption: espresso")


def test_create_with_model_and_an_open_file(client, frame):
    with frame.open("rb") as fh:
        pred = client.predictions.create(model="salesforce/blip", input={"image": fh})
    assert pred.input["image"].startswith(f"{client._base_url}/v1/files/")  # the file's URL, echoed
    pred.wait()
    assert pred.status == "succeeded" and pred.output.startswith("Caption: espresso")
    with frame.open("rb") as fh:
        assert client.run("salesforce/blip", input={"image": fh}).startswith("Caption: espresso")


def test_create_by_version_with_an_open_file_and_a_question(client, frame):
    with frame.open("rb") as fh:
        pred = client.predictions.create(
            version=VERSION, input={"image": fh, "task": "visual_question_answering", "question": "is it an espresso?"},
            wait=True,
        )
    assert pred.status == "succeeded" and pred.output.startswith("Answer: yes")


# -- the Files API --------------------------------------------------------------------------------
def test_files_create_get_list_download_delete(client, server, frame):
    data = frame.read_bytes()
    made = client.files.create(io.BytesIO(data), filename="cam-01.png", metadata={"device": "cam-01"})
    assert made.name == "cam-01.png" and made.size == len(data) and made.metadata == {"device": "cam-01"}
    assert set(made.checksums) == {"sha256", "md5"} and made.etag == made.checksums["md5"]
    assert made.expires_at > made.created_at and made.urls["get"] == f"{server}/v1/files/{made.id}"
    assert client.files.get(made.id).checksums == made.checksums
    assert made.id in [f.id for f in client.files.list()]
    # the signed download URL needs no token; the plain one does
    assert httpx.get(made.urls["download"]).content == data
    assert httpx.get(f"{server}/v1/files/{made.id}/download").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{server}/v1/files/{made.id}/download", headers=auth).content == data
    assert client.files.delete(made.id) is True
    with pytest.raises(ReplicateError) as err:
        client.files.get(made.id)
    assert err.value.status == 404 and err.value.title == "Not Found"
    assert made.id not in [f.id for f in client.files.list()]


def test_files_belong_to_their_token(server, frame):
    mine = Client(api_token=TOKEN, base_url=server).files.create(frame)
    other = Client(api_token="r8_someone_else", base_url=server)
    with pytest.raises(ReplicateError) as err:
        other.files.get(mine.id)
    assert err.value.status == 401  # not one of the service's tokens at all


def test_a_deleted_file_makes_the_prediction_fail_clearly(client, frame):
    made = client.files.create(frame)
    client.files.delete(made.id)
    pred = client.predictions.create(version=VERSION, input={"image": made.urls["get"]}, wait=True)
    assert pred.status == "failed" and "does not exist" in pred.error


# -- webhooks, one per option the client can send -----------------------------------------------
class Receiver:
    """A real HTTP server on loopback recording each POST (path, headers, body)."""

    def __init__(self) -> None:
        self.got: queue.Queue = queue.Queue()
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                got.put((self.path, dict(self.headers), body.decode()))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def take(self, timeout: float = 15.0) -> tuple[str, dict, str]:
        return self.got.get(timeout=timeout)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_webhook_with_events_filter_delivers_signed_start_and_completed(client, frame, receiver):
    secret = client.webhooks.default.secret()
    with frame.open("rb") as fh:
        pred = client.predictions.create(
            version=VERSION, input={"image": fh}, webhook=f"{receiver.url}/all",
            webhook_events_filter=["start", "completed"],
        )
    seen = []
    while not seen or seen[-1]["status"] != "succeeded":
        path, headers, body = receiver.take()
        assert path == "/all"
        assert client.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300) is None
        seen.append(json.loads(body))
    assert [p["status"] for p in seen] == ["processing", "succeeded"]  # start, then completed
    assert {p["id"] for p in seen} == {pred.id} and seen[-1]["output"].startswith("Caption: espresso")


def test_webhook_completed_is_delivered_to_its_own_url(client, frame, receiver):
    secret = client.webhooks.default.secret()
    with frame.open("rb") as fh:
        pred = client.predictions.create(
            version=VERSION, input={"image": fh}, webhook=f"{receiver.url}/events",
            webhook_events_filter=["start"], webhook_completed=f"{receiver.url}/done",
        )
    by_path: dict[str, list[dict]] = {}
    while "/done" not in by_path or "/events" not in by_path:
        path, headers, body = receiver.take()
        client.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)
        by_path.setdefault(path, []).append(json.loads(body))
    assert [p["status"] for p in by_path["/done"]] == ["succeeded"]
    assert by_path["/done"][0]["id"] == pred.id
    assert [p["status"] for p in by_path["/events"]] == ["processing"]  # the filter held for `webhook`


def test_webhook_completed_alone(client, frame, receiver):
    secret = client.webhooks.default.secret()
    pred = client.predictions.create(version=VERSION, input={"image": frame}, webhook_completed=f"{receiver.url}/c")
    path, headers, body = receiver.take()
    client.webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)
    assert path == "/c" and json.loads(body)["id"] == pred.id and json.loads(body)["status"] == "succeeded"


def test_webhook_options_that_cannot_work_are_refused_by_name(client, frame):
    with pytest.raises(ReplicateError) as err:
        client.predictions.create(version=VERSION, input={"image": frame}, webhook_events_filter=["completed"])
    assert err.value.status == 422 and "webhook_events_filter" in err.value.detail
    with pytest.raises(ReplicateError) as err:
        client.predictions.create(version=VERSION, input={"image": frame}, webhook_completed="not a url")
    assert err.value.status == 422 and "webhook_completed" in err.value.detail


# -- streaming ------------------------------------------------------------------------------------
def test_client_stream_yields_the_caption_in_pieces(client, frame):
    pieces = []
    with frame.open("rb") as fh:
        for event in client.stream(REF, input={"image": fh}):
            if event.event.value == "output":
                print("token:", repr(str(event)))
                pieces.append(str(event))
    assert len(pieces) >= 3 and pieces[0] == "Caption:"
    assert "".join(pieces).startswith("Caption: espresso")


def test_prediction_stream_matches_the_final_output_and_logs(client, frame):
    pred = client.predictions.create(version=VERSION, input={"image": frame}, stream=True)
    assert pred.urls["stream"]
    events = list(pred.stream())
    assert events[-1].event.value == "done"
    pred.reload()
    text = "".join(e.data for e in events if e.event.value == "output")
    assert text == pred.output
    logs = [e.data for e in events if e.event.value == "logs"]
    assert "\n".join(logs) + "\n" == pred.logs


async def test_async_stream(client, frame):
    pieces = [str(e) async for e in await client.async_stream("salesforce/blip", input={"image": frame})
              if e.event.value == "output"]
    assert "".join(pieces).startswith("Caption: espresso") and len(pieces) >= 3


def test_a_failing_prediction_streams_an_error(client):
    bad = "data:image/png;base64," + "QUJD" * 10  # "ABC...": not an image
    with pytest.raises(RuntimeError, match="cannot decode the image"):
        list(client.stream(REF, input={"image": bad}))


def test_stream_of_a_prediction_created_without_stream_is_404(client, server, frame):
    pred = client.predictions.create(version=VERSION, input={"image": frame}, wait=True)
    assert "stream" not in pred.urls
    r = httpx.get(f"{server}/v1/predictions/{pred.id}/stream", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["title"] == "Not Found"


# -- models ---------------------------------------------------------------------------------------
def test_models_get_and_versions(client):
    model = client.models.get("salesforce/blip")
    assert (model.owner, model.name) == ("salesforce", "blip") and model.latest_version.id == VERSION
    version = model.versions.get(VERSION)
    assert version.id == VERSION and "Input" in version.openapi_schema["components"]["schemas"]
    assert [v.id for v in model.versions.list()] == [VERSION]
    with pytest.raises(ReplicateError) as err:
        client.models.get("someone/else")
    assert err.value.status == 404 and err.value.title == "Not Found"


async def test_models_async(client):
    model = await client.models.async_get("salesforce", "blip")
    assert (await model.versions.async_get(VERSION)).cog_version == blip.COG_VERSION


def test_concurrent_async_runs_with_files(client, frame):
    async def main():
        with frame.open("rb") as a, frame.open("rb") as b:
            return await asyncio.gather(client.async_run(REF, input={"image": a}),
                                        client.async_run("salesforce/blip", input={"image": b}))
    assert all(o.startswith("Caption: espresso") for o in asyncio.run(main()))
