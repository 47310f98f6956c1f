"""``?limit=`` on the HTTP face's listing endpoints over real HTTP: a bad value is a 400
problem answer (not a 500), and any number is clamped to 1..1000 (no unbounded listings)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from test_delivery_faults import wait_for, write_pipelines

from pipelines.http_face import MAX_LIMIT, _limit, bound_port, create_app, start_http, stop_http
from pipelines.message import Message
from pipelines.router import Router, RouterSettings

ENDPOINTS = ["/v1/stream", "/v1/dead-letters", "/v1/unmatched"]


async def test_limit_is_validated_and_clamped(tmp_path: Path) -> None:
    pf = write_pipelines(tmp_path, [{"name": "d", "url": "http://127.0.0.1:9/x"}])
    pf.write_text(pf.read_text().replace("  p:\n", "  p:\n    filter: {path: /data}\n"))
    async with Router(RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db")) as router:
        for i in range(3):
            await router.accept(Message.new(device_id="d", path="/elsewhere", content_type="text/plain",
                                            payload=f"x{i}".encode()))

        async def unmatched() -> bool:
            return (await router.store.counters())["unmatched"] == 3
        await wait_for(unmatched, 10, "three unmatched messages")
        server = await start_http(create_app(router), "127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound_port(server)}") as http:
                for endpoint in ENDPOINTS:
                    for bad in ("x", "", "1.5", "9" * 5000):
                        r = await http.get(endpoint, params={"limit": bad})
                        assert r.status_code == 400, (endpoint, bad, r.text)
                        assert r.headers["content-type"].startswith("application/problem+json")
                        body = r.json()
                        assert body["status"] == 400 and "limit must be a whole number" in body["detail"]
                assert len((await http.get("/v1/unmatched")).json()) == 3
                assert len((await http.get("/v1/unmatched", params={"limit": "2"})).json()) == 2
                # zero or negative used to mean "no limit" to SQLite: now at least 1, at most 1000
                for low in ("-1", "0", "-99999"):
                    r = await http.get("/v1/unmatched", params={"limit": low})
                    assert r.status_code == 200 and len(r.json()) == 1, (low, r.text)
                r = await http.get("/v1/unmatched", params={"limit": "100000"})
                assert r.status_code == 200 and len(r.json()) == 3
        finally:
            await stop_http(server)


@pytest.mark.parametrize(("query", "expected"), [
    (b"", 100), (b"limit=5", 5), (b"limit=-3", 1), (b"limit=0", 1), (b"limit=1000", 1000),
    (b"limit=1001", MAX_LIMIT), (b"limit=99999999", MAX_LIMIT), (b"limit=%207%20", 7),
])
def test_limit_clamps(query: bytes, expected: int) -> None:
    request = Request({"type": "http", "method": "GET", "path": "/", "query_string": query, "headers": []})
    assert _limit(request) == expected
