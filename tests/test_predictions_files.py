"""The Files API and the event stream over raw HTTP: the malformed and edge cases the official
client never sends (its happy paths are in test_replicate_client.py)."""

from __future__ import annotations

import base64

import httpx
from test_predictions_api import TINY, png, service

from predictions_service import blip

VERSION = blip.VERSION


async def test_upload_needs_multipart(classifier):
    async with service(classifier) as (api, _):
        r = await api.post("/v1/files", content=b"raw bytes", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "content"


async def test_filename_and_type_fields_override_the_part(classifier):
    async with service(classifier) as (api, _):
        r = await api.post("/v1/files", files={"content": ("x.bin", b"12345")},
                           data={"filename": "frame.png", "type": "image/png", "metadata": '{"a": 1}'})
        made = r.json()
        assert r.status_code == 201 and r.headers["location"] == made["urls"]["get"]
        shown = (made["name"], made["content_type"], made["size"], made["metadata"])
        assert shown == ("frame.png", "image/png", 5, {"a": 1})
        r = await api.post("/v1/files", files={"content": ("x.bin", b"1")}, data={"filename": "n" * 256})
        assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "filename"


async def test_download_signatures_are_checked(classifier):
    async with service(classifier) as (api, _):
        made = (await api.post("/v1/files", files={"content": ("a.txt", b"hello", "text/plain")})).json()
        signed = made["urls"]["download"]
        async with httpx.AsyncClient() as anonymous:
            assert (await anonymous.get(signed)).content == b"hello"
            forged = signed.rsplit("signature=", 1)[0] + "signature=AAAA"
            r = await anonymous.get(forged)
            assert r.status_code == 403 and r.json()["title"] == "Forbidden"
            expired = signed.replace("expiry=", "expiry=1", 1)
            assert (await anonymous.get(expired)).status_code == 403  # the expiry is signed too
        await api.delete(f"/v1/files/{made['id']}")
        async with httpx.AsyncClient() as anonymous:
            assert (await anonymous.get(signed)).status_code == 404


async def test_files_list_pages_and_bad_cursor(classifier):
    async with service(classifier) as (api, _):
        ids = [(await api.post("/v1/files", files={"content": (f"{i}.txt", b"x")})).json()["id"] for i in range(102)]
        first = (await api.get("/v1/files")).json()
        assert [f["id"] for f in first["results"]] == ids[::-1][:100] and first["next"]
        second = (await api.get(first["next"])).json()
        assert [f["id"] for f in second["results"]] == ids[::-1][100:] and second["next"] is None
        bad = await api.get("/v1/files", params={"cursor": "!!"})
        assert bad.status_code == 422 and bad.json()["title"] == "Input validation failed"
        assert (await api.delete("/v1/files/nope")).status_code == 404


async def test_stream_resumes_after_last_event_id(classifier):
    from photos import photo

    image = "data:image/png;base64," + base64.b64encode(png(photo("coffee"), (320, 240))).decode()
    async with service(classifier) as (api, _):
        pred = (await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": image},
                                                          "stream": True})).json()
        whole = (await api.get(pred["urls"]["stream"])).text
        events = [block for block in whole.split("\n\n") if block]
        assert events[-1].startswith("event: done") and "id: " in events[0]
        resumed = (await api.get(pred["urls"]["stream"], headers={"Last-Event-ID": "1"})).text
        assert [b for b in resumed.split("\n\n") if b] == events[2:]


async def test_bad_stream_and_webhook_fields_are_422(classifier):
    async with service(classifier) as (api, _):
        for extra, field in [({"stream": "yes"}, "stream"), ({"webhook_completed": 5}, "webhook_completed"),
                             ({"webhook_events_filter": ["completed"]}, "webhook_events_filter")]:
            r = await api.post("/v1/predictions", json={"version": VERSION, "input": {"image": TINY}, **extra})
            assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == field, extra


async def test_models_endpoints_over_http(classifier):
    async with service(classifier) as (api, _):
        model = (await api.get("/v1/models/salesforce/blip")).json()
        assert model["latest_version"]["id"] == VERSION and model["run_count"] == 0
        versions = (await api.get("/v1/models/salesforce/blip/versions")).json()
        assert [v["id"] for v in versions["results"]] == [VERSION] and versions["next"] is None
        missing = await api.get("/v1/models/salesforce/other/versions")
        assert missing.status_code == 404 and missing.json()["title"] == "Not Found"
