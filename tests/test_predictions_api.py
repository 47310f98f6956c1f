"""Contract suite for the local predictions service: every endpoint and error over real HTTP.

The service runs under uvicorn on a free loopback port with the real model; images come inline
(data URLs) or from a second real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import socket
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
import uvicorn
from photos import photo
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from predictions_service import Settings, blip, running
from predictions_service.model import Classifier
from predictions_service.runner import PredictionRunner

TOKEN = "r8_contract_suite_token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VERSION = blip.VERSION
ID_RE = re.compile(r"^[0-9a-z]{26}$")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
FIELDS = {
    "id",
    "model",
    "version",
    "input",
    "output",
    "logs",
    "error",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "data_removed",
    "metrics",
    "urls",
}


def png(array: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    img = Image.fromarray(array)
    if size:
        img.thumbnail(size)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


COFFEE = data_url(png(photo("coffee"), (320, 240)))
TINY = data_url(png(np.full((8, 8, 3), 200, np.uint8)))


@contextlib.asynccontextmanager
async def service(classifier: Classifier, **overrides) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = Settings(port=0, tokens=(TOKEN,), log_level="warning", **overrides)
    async with running(settings, PredictionRunner(settings, classifier=classifier)) as url:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:  # needs url
            yield client, settings


# One service for the tests that don't need settings of their own (saves a server start per test).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(classifier):
    # its tests fetch images from a host on loopback (the default refuses those: see test_predictions_bounds)
    async with service(classifier, allow_private_urls=True) as (client, _):
        yield client


@contextlib.asynccontextmanager
async def serve_app(app: Starlette, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Run another starlette app on loopback (image host, stalling host)."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


class ImageHost:
    """/coffee.png, /missing (404) and /stall.png (answers once ``release`` is set)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.stalled = 0
        coffee = png(photo("coffee"), (320, 240))

        async def image(request: Request) -> Response:
            return Response(coffee, media_type="image/png")

        async def stall(request: Request) -> Response:
            self.stalled += 1
            await self.release.wait()
            return Response(coffee, media_type="image/png")

        async def missing(request: Request) -> Response:
            return Response("no", status_code=404)

        self.app = Starlette(
            routes=[Route("/coffee.png", image), Route("/stall.png", stall), Route("/missing", missing)]
        )


@pytest_asyncio.fixture(loop_scope="module")
async def images():
    host = ImageHost()
    async with serve_app(host.app) as url:
        host.url = url
        yield host
        host.release.set()


async def poll(client: httpx.AsyncClient, pred_id: str, until, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = (await client.get(f"/v1/predictions/{pred_id}")).json()
        if until(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


def assert_problem(
    r: httpx.Response, status: int, title: str | None = None, detail: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]  # every error has all three, as Replicate's
    if title is not None:
        assert body["title"] == title
    if detail is not None:
        assert body["detail"] == detail
    return body


# -- auth ------------------------------------------------------------------------------------------


async def test_missing_token_is_401(api):
    r = await api.get("/v1/predictions", headers={"Authorization": ""})
    assert_problem(r, 401, "Unauthenticated", "You did not pass an authentication token")


@pytest.mark.parametrize("header", ["Bearer wrong", "Token wrong", f"Basic {TOKEN}", "Bearer"])
async def test_bad_token_is_401(api, header):
    r = await api.get("/v1/predictions", headers={"Authorization": header})
    body = assert_problem(r, 401, "Unauthenticated")
    assert "authentication token" in body["detail"] and "wrong" not in body["detail"]


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"Token {TOKEN}", f"bearer {TOKEN}"])
async def test_bearer_and_legacy_token_are_accepted(api, header):
    r = await api.get("/v1/predictions", headers={"Authorization": header})
    assert r.status_code == 200


# -- creating --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "version"),
    [
        ("/v1/predictions", VERSION),
        ("/v1/predictions", f"salesforce/blip:{VERSION}"),
        ("/v1/predictions", "salesforce/blip"),
        ("/v1/models/salesforce/blip/predictions", None),
        ("/v1/deployments/acme/camera-captions/predictions", None),
    ],
)
async def test_sync_create_in_every_form(api, path, version):
    body: dict = {"input": {"image": COFFEE}}
    if version:
        body["version"] = version
    r = await api.post(path, json=body, headers={"Prefer": "wait"})
    assert r.status_code == 201, r.text
    pred = r.json()
    assert set(pred) == FIELDS
    assert pred["status"] == "succeeded", pred
    assert pred["output"].startswith("Caption: espresso (") or pred["output"].startswith("Caption: cup (")
    assert (pred["model"], pred["version"]) == ("salesforce/blip", VERSION)
    assert ID_RE.match(pred["id"])
    for key in ("created_at", "started_at", "completed_at"):
        assert TS_RE.match(pred[key]), pred[key]
    assert pred["error"] is None and pred["data_removed"] is False
    assert set(pred["metrics"]) == {"predict_time", "total_time"}
    assert pred["metrics"]["total_time"] >= pred["metrics"]["predict_time"] >= 0
    base = str(api.base_url).rstrip("/")
    assert pred["urls"] == {
        "get": f"{base}/v1/predictions/{pred['id']}",
        "cancel": f"{base}/v1/predictions/{pred['id']}/cancel",
        "web": f"{base}/p/{pred['id']}",
    }
    assert r.headers["location"] == pred["urls"]["get"]
    assert r.headers["preference-applied"] == "wait=60"
    assert r.headers["content-type"] == "application/json"
    assert 0 <= int(r.headers["ratelimit-remaining"]) < 600 and r.headers["ratelimit-reset"] == "1"
    assert "EfficientNet-Lite0" in pred["logs"]
    web = await api.get(f"/p/{pred['id']}")
    assert web.json()["id"] == pred["id"]


async def test_async_create_then_poll(api):
    r = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": COFFEE}})
    assert r.status_code == 201
    pred = r.json()
    assert pred["status"] == "starting" and pred["output"] is None and pred["completed_at"] is None
    assert pred["metrics"] == {} and "preference-applied" not in r.headers
    done = await poll(api, pred["id"], lambda p: p["status"] == "succeeded")
    assert done["output"].startswith("Caption: ")
    again = await api.get(f"/v1/predictions/{pred['id']}")
    assert int(again.headers["ratelimit-remaining"]) < 3000


@pytest.mark.parametrize("prefer", ["wait=0", "wait=61", "wait=abc", "respond-async"])
async def test_invalid_prefer_is_ignored(api, prefer):
    r = await api.post(
        "/v1/predictions", json={"version": VERSION, "input": {"image": TINY}}, headers={"Prefer": prefer}
    )
    assert r.status_code == 201 and "preference-applied" not in r.headers


async def test_vqa_and_itm_tasks(api):
    r = await api.post(
        "/v1/predictions",
        headers={"Prefer": "wait=10"},
        json={
            "version": VERSION,
            "input": {"image": COFFEE, "task": "visual_question_answering", "question": "Is there espresso?"},
        },
    )
    assert r.headers["preference-applied"] == "wait=10"
    assert r.json()["output"].startswith("Answer: yes (espresso ")
    r = await api.post(
        "/v1/predictions",
        headers={"Prefer": "wait=10"},
        json={
            "version": VERSION,
            "input": {"image": COFFEE, "task": "image_text_matching", "caption": "espresso"},
        },
    )
    assert r.json()["output"].startswith("The image and text are matched with a probability of 0.")


@pytest.mark.parametrize(
    ("inp", "error"),
    [
        ({"image": data_url(b"%PDF-1.4 not an image", "application/pdf")}, "image: cannot decode the image"),
        ({"image": "data:image/png;base64,@@@not-base64@@@"}, "image: the data URL's base64 is invalid"),
        ({"image": "data:image/png;base64"}, "image: malformed data URL"),
        ({"image": COFFEE, "task": "visual_question_answering"}, "question is required"),
        ({"image": COFFEE, "task": "image_text_matching", "caption": "  "}, "caption is required"),
    ],
)
async def test_inputs_the_model_cannot_use_fail_the_prediction(api, inp, error):
    r = await api.post("/v1/predictions", json={"version": VERSION, "input": inp}, headers={"Prefer": "wait"})
    assert r.status_code == 201
    pred = r.json()
    assert pred["status"] == "failed" and pred["output"] is None
    assert pred["error"].startswith(error) or error in pred["error"], pred["error"]


async def test_unknown_input_keys_are_ignored_and_logged(api):
    r = await api.post(
        "/v1/predictions",
        json={"version": VERSION, "input": {"image": TINY, "seed": 3}},
        headers={"Prefer": "wait"},
    )
    pred = r.json()
    assert pred["status"] == "succeeded" and "ignored unknown input keys: seed" in pred["logs"]


async def test_image_from_http_urls(api, images):
    ok = await api.post(
        "/v1/predictions",
        json={"version": VERSION, "input": {"image": f"{images.url}/coffee.png"}},
        headers={"Prefer": "wait"},
    )
    assert ok.json()["status"] == "succeeded" and "espresso" in ok.json()["output"]
    missing = await api.post(
        "/v1/predictions",
        json={"version": VERSION, "input": {"image": f"{images.url}/missing?X-Amz-Signature=secret123"}},
        headers={"Prefer": "wait"},
    )
    assert missing.json()["status"] == "failed" and "answered HTTP 404" in missing.json()["error"]
    assert "secret123" not in missing.json()["error"]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    port = closed.getsockname()[1]
    try:
        refused = await api.post(
            "/v1/predictions",
            headers={"Prefer": "wait"},
            json={"version": VERSION, "input": {"image": f"http://127.0.0.1:{port}/x.png"}},
        )
    finally:
        closed.close()
    assert refused.json()["status"] == "failed" and "could not fetch" in refused.json()["error"]


# -- 4xx on create ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    ["0" * 64, f"salesforce/blip:{'0' * 64}", "someone/else", f"someone/else:{VERSION}", "not a version", ""],
)
async def test_invalid_version_is_422(api, version):
    r = await api.post("/v1/predictions", json={"version": version, "input": {"image": TINY}})
    assert_problem(
        r,
        422,
        "Invalid version or not permitted",
        "The specified version does not exist (or perhaps you don't have permission to use it?)",
    )


@pytest.mark.parametrize(
    ("body", "detail", "kinds"),
    [
        (
            {"version": VERSION, "input": {"image": TINY}, "model": "x"},
            "- Additional property model is not allowed\n",
            ["additional_property_not_allowed"],
        ),
        ({"version": VERSION, "input": {}}, "- input: image is required\n", ["required"]),
        ({"version": VERSION}, "- input is required\n", ["required"]),
        ({"input": {"image": TINY}}, "- version is required\n", ["required"]),
        (
            {"version": 7, "input": {"image": TINY}},
            "- version: Invalid type. Expected: string\n",
            ["invalid_type"],
        ),
        (
            {"version": VERSION, "input": "x"},
            "- input: Invalid type. Expected: object, given: string\n",
            ["invalid_type"],
        ),
        (
            {"version": VERSION, "input": {"image": TINY, "task": "draw"}},
            "- input.task: task must be one of the following: "
            '"image_captioning", "visual_question_answering", "image_text_matching"\n',
            ["enum"],
        ),
        (
            {"version": VERSION, "input": {"image": TINY}, "webhook": "not a url"},
            "- webhook: Does not match format 'uri' (an http(s) URL)\n",
            ["format"],
        ),
        (
            {"version": VERSION, "input": {"image": TINY}, "webhook_events_filter": ["done"]},
            '- webhook_events_filter: webhook_events_filter must be an array of: "start", "output", "logs", '
            '"completed"\n',
            ["enum"],
        ),
        (
            {"version": VERSION, "foo": 1},
            "- Additional property foo is not allowed\n- input is required\n",
            ["additional_property_not_allowed", "required"],
        ),
    ],
)
async def test_input_validation_is_422(api, body, detail, kinds):
    r = await api.post("/v1/predictions", json=body)
    problem = assert_problem(r, 422, "Input validation failed", detail)
    assert [f["type"] for f in problem["invalid_fields"]] == kinds
    assert "ratelimit-remaining" in r.headers


async def test_version_key_is_not_allowed_on_model_routes(api):
    r = await api.post(
        "/v1/models/salesforce/blip/predictions", json={"version": VERSION, "input": {"image": TINY}}
    )
    assert_problem(r, 422, "Input validation failed", "- Additional property version is not allowed\n")


async def test_unknown_model_route_is_404(api):
    r = await api.post("/v1/models/stability-ai/sdxl/predictions", json={"input": {"prompt": "x"}})
    assert_problem(r, 404, "Not Found", "The requested resource could not be found.")


async def test_body_that_is_not_json_or_not_an_object(api):
    r = await api.post("/v1/predictions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_problem(r, 400, "Bad Request")["detail"]
    r = await api.post("/v1/predictions", json=[1, 2])
    assert_problem(r, 422, "Input validation failed", "- Invalid type. Expected: object\n")


async def test_too_large_body_is_413(classifier):
    async with service(classifier, max_body_bytes=1000) as (client, _):
        r = await client.post("/v1/predictions", json={"version": VERSION, "input": {"image": COFFEE}})
        assert_problem(r, 413, "Request Entity Too Large")


@pytest.mark.parametrize("value", ["soon", "4s", "25h", "5x", "-5"])
async def test_bad_cancel_after_is_422(api, value):
    r = await api.post(
        "/v1/predictions",
        json={"version": VERSION, "input": {"image": TINY}},
        headers={"Cancel-After": value},
    )
    problem = assert_problem(r, 422, "Input validation failed")
    assert problem["invalid_fields"][0]["field"] == "Cancel-After"


# -- waiting, cancelling, deadlines ----------------------------------------------------------------


async def test_sync_timeout_answers_starting_and_cancel_works(api, images):
    r = await api.post(
        "/v1/predictions",
        json={"version": VERSION, "input": {"image": f"{images.url}/stall.png"}},
        headers={"Prefer": "wait=1"},
    )
    assert r.status_code == 201 and r.headers["preference-applied"] == "wait=1"
    pred = r.json()
    assert pred["status"] == "starting" and pred["output"] is None
    assert (await api.get(f"/v1/predictions/{pred['id']}")).json()["status"] == "processing"
    c = await api.post(f"/v1/predictions/{pred['id']}/cancel")
    assert c.status_code == 200
    canceled = c.json()
    assert canceled["status"] == "canceled" and canceled["completed_at"] and canceled["started_at"]
    assert set(canceled["metrics"]) == {"predict_time", "total_time"}
    images.release.set()
    await asyncio.sleep(0.2)
    assert (await api.get(f"/v1/predictions/{pred['id']}")).json()["status"] == "canceled"


async def test_a_held_create_with_a_big_image_leaves_the_service_answering(classifier):
    # A lone Prefer: wait prediction of a small image may run on the event loop's thread (runner.py);
    # a big one must not: while it runs, other calls are answered and see it processing.
    big = data_url(png(np.full((3000, 4000, 3), 120, np.uint8)))  # 12 Mpx, ~40 KB of PNG
    async with service(classifier, inline_runs=True) as (api, _):  # as `pipeline predictions serve` runs
        create = asyncio.create_task(
            api.post("/v1/predictions", json={"version": VERSION, "input": {"image": big}}, headers={"Prefer": "wait"})
        )
        seen = []
        while not create.done():
            newest = (await api.get("/v1/predictions")).json()["results"][:1]
            if newest and newest[0]["status"] != "starting":
                seen.append(newest[0]["status"])
                break
        pred = (await create).json()
    assert pred["status"] == "succeeded" and pred["output"].startswith("Caption: ")
    assert seen == ["processing"], "the service did not answer while the big image was being processed"


async def test_cancel_of_a_finished_prediction_changes_nothing(api):
    pred = (
        await api.post(
            "/v1/predictions", json={"version": VERSION, "input": {"image": TINY}}, headers={"Prefer": "wait"}
        )
    ).json()
    c = await api.post(f"/v1/predictions/{pred['id']}/cancel")
    assert c.status_code == 200 and c.json()["status"] == "succeeded" and c.json()["output"] == pred["output"]


async def test_unknown_prediction_is_404(api):
    for r in (await api.get("/v1/predictions/" + "a" * 26), await api.post("/v1/predictions/nope/cancel")):
        assert_problem(r, 404, detail="The requested resource could not be found.")


async def test_cancel_after_cancels_a_running_and_aborts_a_queued_prediction(api, images):
    body = {"version": VERSION, "input": {"image": f"{images.url}/stall.png"}}
    running_pred = (await api.post("/v1/predictions", json=body, headers={"Cancel-After": "6s"})).json()
    queued = (
        await api.post(
            "/v1/predictions",
            json={"version": VERSION, "input": {"image": TINY}},
            headers={"Cancel-After": "5"},
        )
    ).json()
    assert TS_RE.match(running_pred["deadline"]) and queued["deadline"]
    queued_done = await poll(api, queued["id"], lambda p: p["status"] != "starting", timeout=8)
    assert (await api.get(f"/v1/predictions/{running_pred['id']}")).json()["status"] == "processing"
    running_done = await poll(api, running_pred["id"], lambda p: p["status"] != "processing", timeout=4)
    assert running_done["status"] == "canceled" and "deadline" in running_done["error"]
    assert queued_done["status"] == "aborted" and queued_done["started_at"] is None
    assert queued_done["metrics"]["predict_time"] == 0


# -- listing, versions, secret ---------------------------------------------------------------------


async def test_list_is_newest_first_in_pages_of_100(classifier):
    async with service(classifier) as (api, _):
        await check_pages_of_100(api)


async def check_pages_of_100(api: httpx.AsyncClient) -> None:
    created = []
    for _ in range(103):
        r = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": "data:,x"}})
        created.append(r.json()["id"])
    first = (await api.get("/v1/predictions")).json()
    assert [p["id"] for p in first["results"]] == created[::-1][:100]
    assert first["previous"] is None and "cursor=" in first["next"]
    assert first["next"].startswith(str(api.base_url).rstrip("/") + "/v1/predictions?")
    second = (await api.get(first["next"])).json()
    assert [p["id"] for p in second["results"]] == created[::-1][100:]
    assert second["next"] is None
    bad = await api.get("/v1/predictions", params={"cursor": "!!!"})
    assert_problem(bad, 422, "Input validation failed")


async def test_list_filters_by_creation_time(classifier):
    async with service(classifier) as (api, _):
        await check_time_filters(api)


async def check_time_filters(api: httpx.AsyncClient) -> None:
    first = (await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": TINY}})).json()
    await asyncio.sleep(0.01)
    second = (await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": TINY}})).json()
    after = await api.get("/v1/predictions", params={"created_after": first["created_at"]})
    assert [p["id"] for p in after.json()["results"]] == [second["id"]]
    before = await api.get("/v1/predictions", params={"created_before": second["created_at"]})
    assert [p["id"] for p in before.json()["results"]] == [first["id"]]
    bad = await api.get("/v1/predictions", params={"created_after": "yesterday"})
    assert_problem(bad, 422, "Input validation failed")


async def test_data_is_removed_after_the_retention_period(classifier):
    async with service(classifier, data_retention_seconds=0.3) as (api, _):
        body = {"version": VERSION, "input": {"image": TINY}}
        pred = (await api.post("/v1/predictions", json=body, headers={"Prefer": "wait"})).json()
        assert pred["data_removed"] is False and pred["output"]
        gone = await poll(api, pred["id"], lambda p: p["data_removed"], timeout=3)
        assert gone["data_removed"] is True and gone["status"] == "succeeded"
        assert (gone["input"], gone["output"], gone["logs"]) == ({}, None, "")


async def test_only_the_newest_predictions_are_kept(classifier):
    async with service(classifier, max_predictions=3) as (api, _):
        body = {"version": VERSION, "input": {"image": TINY}}
        ids = [
            (await api.post("/v1/predictions", json=body, headers={"Prefer": "wait"})).json()["id"]
            for _ in range(5)
        ]
        listed = (await api.get("/v1/predictions")).json()["results"]
        assert [p["id"] for p in listed] == ids[::-1][:3]
        assert (await api.get(f"/v1/predictions/{ids[0]}")).status_code == 404


async def test_version_endpoint_describes_blip(api):
    r = await api.get(f"/v1/models/salesforce/blip/versions/{VERSION}")
    assert r.status_code == 200
    v = r.json()
    assert v["id"] == VERSION and isinstance(v["cog_version"], str) and TS_RE.match(v["created_at"])
    schemas = v["openapi_schema"]["components"]["schemas"]
    assert schemas["Input"]["required"] == ["image"]
    assert set(schemas["Input"]["properties"]) == {"image", "task", "question", "caption"}
    assert schemas["task"]["enum"] == ["image_captioning", "visual_question_answering", "image_text_matching"]
    assert schemas["Output"] == {"type": "string", "title": "Output"}
    missing = await api.get(f"/v1/models/salesforce/blip/versions/{'1' * 64}")
    assert_problem(missing, 404)


async def test_webhook_secret_endpoint(classifier):
    secret = "whsec_" + base64.b64encode(b"0123456789abcdefghijklmn").decode()
    async with service(classifier, webhook_secret=secret) as (client, _):
        r = await client.get("/v1/webhooks/default/secret")
        assert r.status_code == 200 and r.json() == {"key": secret}
        assert (
            await client.get("/v1/webhooks/default/secret", headers={"Authorization": ""})
        ).status_code == 401


async def test_healthz_needs_no_token(api):
    r = await api.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["version"] == VERSION


# -- rate limits and faults ------------------------------------------------------------------------


async def test_create_rate_limit_is_429_with_retry_after(classifier):
    async with service(classifier, create_rate_per_minute=2, other_rate_per_minute=3) as (client, _):
        body = {"version": VERSION, "input": {"image": TINY}}
        assert (await client.post("/v1/predictions", json=body)).headers["ratelimit-remaining"] == "1"
        assert (await client.post("/v1/predictions", json=body)).headers["ratelimit-remaining"] == "0"
        r = await client.post("/v1/predictions", json=body)
        problem = assert_problem(r, 429, "Too Many Requests")
        assert re.fullmatch(r"Request was throttled\. Your rate limit resets in ~\d+s\.", problem["detail"])
        assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-remaining"] == "0"
        # other calls have their own budget
        for _ in range(3):
            assert (await client.get("/v1/predictions")).status_code == 200
        assert_problem(await client.get("/v1/predictions"), 429)


@pytest.mark.parametrize(("kind", "status"), [("500", 500), ("503", 503), ("429", 429)])
async def test_fault_mode_injects_errors(classifier, kind, status):
    async with service(classifier, fault_rate=1.0, fault_kinds=(kind,)) as (client, _):
        r = await client.get("/v1/predictions")
        problem = assert_problem(r, status)
        assert "injected fault" in problem["detail"]
        if status == 429:
            assert r.headers["retry-after"] == "1"


async def test_fault_mode_slow(classifier):
    async with service(classifier, fault_rate=1.0, fault_kinds=("slow",), fault_slow_seconds=0.3) as (
        client,
        _,
    ):
        start = time.monotonic()
        r = await client.get("/v1/predictions")
        assert r.status_code == 200 and time.monotonic() - start >= 0.3


async def test_fault_rate_is_a_rate(classifier):
    async with service(classifier, fault_rate=0.5, fault_kinds=("500",), fault_seed=7) as (client, _):
        codes = [(await client.get("/v1/predictions")).status_code for _ in range(40)]
        assert 5 < codes.count(500) < 35 and codes.count(200) == 40 - codes.count(500)
