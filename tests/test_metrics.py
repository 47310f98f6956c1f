"""The router's HTTP face: /metrics (the books and per-queue figures), /healthz, /readyz and
the opt-in HTTP ingest, served by a real uvicorn on loopback and read with a real client."""

from __future__ import annotations

from pathlib import Path

import httpx
from delivery_sink import Answer, Sink, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_delivery_faults import FAST_RETRY, frame, wait_for, write_pipelines

from pipelines.http_face import bound_port, create_app, start_http, stop_http
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from pipelines.store import BOOKS


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_export_books_queues_latency_retries_and_dead_letters(tmp_path: Path) -> None:
    with Sink() as sink:
        sink.answer("/ok", lambda n: Answer(503) if n == 0 else Answer(204))
        sink.answer("/gone", lambda n: Answer(404))
        pf = write_pipelines(tmp_path, [{"name": "ok", "url": sink.url("/ok"), "retry": FAST_RETRY},
                                        {"name": "gone", "url": sink.url("/gone"), "retry": FAST_RETRY}])
        pf.write_text(pf.read_text().replace("  p:\n", "  p:\n    filter: {path: /data}\n"))
        async with Router(RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db")) as router:
            server = await start_http(create_app(router), "127.0.0.1", 0)
            base = f"http://127.0.0.1:{bound_port(server)}"
            try:
                async with httpx.AsyncClient(base_url=base) as http:
                    assert (await http.get("/healthz")).json() == {"status": "ok"}
                    assert (await http.get("/readyz")).status_code == 200
                    for i in range(2):
                        await router.accept(frame(i))
                    await router.accept(Message.new(device_id="d", path="/elsewhere",
                                                    content_type="text/plain", payload=b"x"))

                    async def settled() -> bool:
                        b = await router.store.counters()
                        return b["deliveries_delivered"] == 2 and b["deliveries_dead"] == 2
                    await wait_for(settled, 10, "deliveries to settle")
                    await wait_for(lambda: not router.queue_depths.get(("p", "ok")), 2, "queue depth 0")
                    r = await http.get("/metrics")
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
                    m = samples(r.text)
            finally:
                await stop_http(server)

    for book in BOOKS:
        assert m[("pipeline_books_gap", (("book", book),))] == 0
    assert m[("pipeline_ingested_total", ())] == 3
    assert m[("pipeline_unmatched_total", ())] == 1
    assert m[("pipeline_routed_total", ())] == 2
    assert m[("pipeline_deliveries_enqueued_total", ())] == 4
    assert m[("pipeline_deliveries_queued", ())] == 0
    assert m[("pipeline_dead_letters_open", ())] == 2
    def at(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    ok, gone = {"pipeline": "p", "step": "ok"}, {"pipeline": "p", "step": "gone"}
    assert at("pipeline_delivery_retries_total", **ok, status="503") == 1
    assert at("pipeline_delivery_dead_letters_total", **gone, reason="permanent:404") == 2
    assert at("pipeline_delivery_delivered_total", **ok) == 2
    assert at("pipeline_delivery_latency_seconds_count", **ok) == 2
    assert at("pipeline_delivery_latency_seconds_bucket", **ok, le="+Inf") == 2
    assert at("pipeline_delivery_latency_seconds_sum", **ok) > 0
    assert at("pipeline_queue_depth", **gone) == 0
    assert at("pipeline_deliveries_in_flight", **ok) == 0


async def test_readyz_and_http_ingest_push_back_when_a_queue_is_full(tmp_path: Path) -> None:
    pf = write_pipelines(tmp_path, [{"name": "dead", "url": f"http://127.0.0.1:{free_port()}/x",
                                     "retry": {**FAST_RETRY, "max_attempts": 10_000}}])
    settings = RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db", max_queue=3,
                              overload_retry_after=7, extra={"http_ingest": True})
    async with Router(settings) as router:
        server = await start_http(create_app(router), "127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound_port(server)}") as http:
                r = await http.post("/v1/ingest/demo/cam-1/img/raw", content=b"\x00\x01",
                                    headers={"Content-Type": "image/x-raw", "Message-Id": "frame-1"})
                assert r.status_code == 202 and r.json() == {"id": "frame-1"}
                rows = await router.store.fetch_inbox(0) or []
                if rows:  # not routed yet: check what was stored
                    assert rows[0].message.path == "/img/raw"
                r = await http.post("/v1/ingest/demo/cam-1/x", content=b"", headers={"Message-Id": "bad id!"})
                assert r.status_code == 400 and "Message-Id" in r.json()["error"]
                r = await http.post("/v1/ingest/demo/cam-1/a%0Db", content=b"x")  # a CR in the path
                assert r.status_code == 400 and "U+000D" in r.json()["error"]
                for i in range(3):
                    await http.post("/v1/ingest/demo/cam-1/x", content=b"x", headers={"Message-Id": f"m{i}"})

                async def not_ready() -> bool:
                    return (await http.get("/readyz")).status_code == 503
                await wait_for(not_ready, 5, "/readyz to report the full queue")
                body = (await http.get("/readyz")).json()
                assert body["status"] == "not ready" and "p/dead" in body["reason"]
                r = await http.post("/v1/ingest/demo/cam-1/x", content=b"y", headers={"Message-Id": "late"})
                assert r.status_code == 503 and r.headers["retry-after"] == "7"
                assert (await http.get("/healthz")).status_code == 200  # alive, just full
            books = await router.store.counters()
            assert books["ingested"] == 4  # the refused one never entered the books
            dl = await router.store.queue_depths()
            assert dl[("p", "dead")] == 4
        finally:
            await stop_http(server)


async def test_http_ingest_is_off_unless_asked_for(tmp_path: Path) -> None:
    pf = write_pipelines(tmp_path, [{"name": "d", "url": "http://127.0.0.1:9/x"}])
    async with Router(RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db")) as router:
        server = await start_http(create_app(router), "127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound_port(server)}") as http:
                r = await http.post("/v1/ingest/demo/cam-1/x", content=b"x")
                assert r.status_code in (404, 405)
        finally:
            await stop_http(server)
        assert (await router.store.counters())["ingested"] == 0
