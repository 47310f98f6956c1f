"""pipelines.outbound_http against a real HTTP server on loopback."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pipelines.components import DeliveryError
from pipelines.message import Message
from pipelines.outbound_http import (
    cloudevents_headers,
    is_retryable_status,
    make_client,
    parse_retry_after,
    post_message,
    rewrite_url,
)

try:
    from tests.http_recorder import HTTPRecorder, Reply
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder, Reply

BINARY = bytes(range(256)) * 3 + b"\x00\xff\r\n"
WHEN = datetime(2026, 11, 23, 1, 2, 3, 456789, tzinfo=UTC)


def message(payload: bytes = BINARY, content_type: str = "application/octet-stream",
            path: str = "/images") -> Message:
    return Message.new(device_id="cam-1", project_id="demo", path=path, content_type=content_type,
                       payload=payload, timestamp=WHEN, id="6f1c7a52-0000-4000-8000-000000000001")


@pytest.fixture
def server():
    with HTTPRecorder() as srv:
        yield srv


@pytest.fixture(params=["stock httpx", "make_client"])
async def client(request):
    """Both clients post_message is used with: a plain httpx client, and the router's
    (make_client: its lean aiohttp path must behave the same)."""
    async with (httpx.AsyncClient() if request.param == "stock httpx" else make_client()) as c:
        yield c


async def test_posts_exact_bytes_with_cloudevents_headers(server, client):
    response = await post_message(client, server.url("/hook?x=1"), message())
    assert response.status_code == 204
    [req] = server.requests
    assert req.method == "POST" and req.path == "/hook?x=1"
    assert req.body == BINARY
    h = req.headers
    assert h["Content-Type"] == "application/octet-stream"
    assert h["Ce-Specversion"] == "1.0"
    assert h["Ce-Id"] == "6f1c7a52-0000-4000-8000-000000000001"
    assert h["Ce-Source"] == "cam-1"
    assert h["Ce-Subject"] == "demo"
    assert h["Ce-Type"] == "io.golioth.data.v1/.s/images"
    assert h["Ce-Time"] == "2026-11-23T01:02:03.456789Z"
    assert h["Content-Length"] == str(len(BINARY))


async def test_user_headers_are_added_and_override_ours_case_insensitively(server, client):
    await post_message(client, server.url(), message(b"{}", "application/json"),
                       headers={"Authorization": "Bearer t0k", "content-type": "application/x-custom",
                                "ce-source": "someone-else"})
    [req] = server.requests
    names = [name.lower() for name, _ in req.header_items]
    assert names.count("content-type") == 1 and names.count("ce-source") == 1
    assert req.headers["Authorization"] == "Bearer t0k"
    assert req.headers["Content-Type"] == "application/x-custom"
    assert req.headers["Ce-Source"] == "someone-else"
    assert req.headers["Ce-Subject"] == "demo"


def test_cloudevents_type_adds_a_missing_leading_slash_and_naive_times_are_utc():
    msg = message(path="temp")
    msg.timestamp = datetime(2024, 1, 2, 3, 4, 5)
    h = cloudevents_headers(msg)
    assert h["Ce-Type"] == "io.golioth.data.v1/.s/temp"
    assert h["Ce-Time"] == "2024-01-02T03:04:05Z"


async def test_2xx_response_is_returned_with_body(server, client):
    server.script(Reply(201, {"Content-Type": "application/json"}, b'{"id":"p1"}'))
    response = await post_message(client, server.url(), message())
    assert response.status_code == 201 and response.json() == {"id": "p1"}


@pytest.mark.parametrize(("status", "retryable"), [
    (408, True), (425, True), (429, True), (500, True), (502, True), (503, True), (504, True),
    (501, False), (400, False), (401, False), (403, False), (404, False), (409, False), (422, False),
    (302, False),
])
async def test_status_classification_over_the_wire(server, client, status, retryable):
    server.script(Reply(status, {"Location": "http://127.0.0.1:1/"} if status == 302 else {}, b"nope"))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url(), message())
    err = info.value
    assert err.status == status and err.retryable is retryable
    assert err.response_excerpt == "nope"
    assert f"HTTP {status}" in err.reason
    assert is_retryable_status(status) is retryable


async def test_429_retry_after_seconds(server, client):
    server.script(Reply(429, {"Retry-After": "7"}, b"slow down"))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url(), message())
    assert info.value.retryable and info.value.status == 429 and info.value.retry_after == 7.0


async def test_503_retry_after_http_date(server, client):
    when = datetime.now(UTC) + timedelta(seconds=120)
    server.script(Reply(503, {"Retry-After": format_datetime(when, usegmt=True)}))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url(), message())
    assert info.value.retryable and info.value.status == 503
    assert 110 <= info.value.retry_after <= 121


async def test_400_is_permanent_and_excerpt_is_cut_to_500_chars(server, client):
    server.script(Reply(400, {"Content-Type": "text/plain"}, b"x" * 5000))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url(), message())
    err = info.value
    assert not err.retryable and err.status == 400 and err.retry_after is None
    assert err.response_excerpt == "x" * 500
    assert "permanent" in err.reason


async def test_connection_refused_is_retryable(client):
    # a bound socket that never listens refuses connections, and no one else can take the port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(DeliveryError) as info:
            await post_message(client, f"http://127.0.0.1:{port}/hook", message())
    err = info.value
    assert err.retryable and err.status is None
    assert "ConnectError" in err.reason and f"127.0.0.1:{port}" in err.reason


async def test_timeout_is_retryable_and_uses_the_context_timeout(server, client):
    server.script(Reply(hang=True))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url(), message(), extra={"timeout": 0.2})
    assert info.value.retryable and info.value.status is None
    assert "timed out after 0.2 s" in info.value.reason


async def test_unusable_url_is_permanent(client):
    with pytest.raises(DeliveryError) as info:
        await post_message(client, "ftp://127.0.0.1/x", message())
    assert not info.value.retryable


async def test_reason_never_shows_url_path_or_query(server, client):
    server.script(Reply(500))
    with pytest.raises(DeliveryError) as info:
        await post_message(client, server.url("/hooks/s3cr3t-path?token=s3cr3t"), message())
    assert "s3cr3t" not in info.value.reason
    assert f"http://127.0.0.1:{server.port}" in info.value.reason


async def test_url_overrides_redirect_to_the_local_service(server, client):
    overrides = {"https://api.replicate.com": f"http://127.0.0.1:{server.port}"}
    await post_message(client, "https://api.replicate.com/v1/predictions", message(),
                       extra={"url_overrides": overrides})
    assert [r.path for r in server.requests] == ["/v1/predictions"]


def test_rewrite_url_matches_whole_bases_only():
    o = {"https://api.replicate.com": "http://127.0.0.1:5010",
         "https://api.replicate.com/v1/special/": "http://127.0.0.1:6000/x"}
    assert rewrite_url("https://api.replicate.com/v1/predictions", o) == \
        "http://127.0.0.1:5010/v1/predictions"
    assert rewrite_url("https://api.replicate.com", o) == "http://127.0.0.1:5010"
    assert rewrite_url("https://api.replicate.com?q=1", o) == "http://127.0.0.1:5010?q=1"
    assert rewrite_url("https://api.replicate.com/v1/special/a", o) == "http://127.0.0.1:6000/x/a"
    assert rewrite_url("https://api.replicate.com.evil.example/v1", o) == \
        "https://api.replicate.com.evil.example/v1"
    assert rewrite_url("https://example.org/", o) == "https://example.org/"
    assert rewrite_url("https://example.org/", {}) == "https://example.org/"


def test_parse_retry_after():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("nan") is None


async def test_request_and_response_hooks_see_the_call(server, client):
    server.script(Reply(201, {"Content-Type": "application/json"}, b'{"id": "pred-1"}'))
    seen: list[tuple] = []

    def add_field(msg: Message, url: str) -> Message | None:
        seen.append(("request", url))
        return msg.evolve(json={**msg.json(), "webhook": "http://cb"}, content_type=msg.content_type)

    def ignore(msg: Message, url: str) -> None:
        return None

    async def remember(msg: Message, url: str, response: httpx.Response) -> None:
        seen.append(("response", url, msg.json(), response.json()))

    extra = {"url_overrides": {"https://api.replicate.com": server.url()},
             "request_hooks": [ignore, add_field], "response_hooks": [remember]}
    await post_message(client, "https://api.replicate.com/v1/predictions",
                       message(b'{"version":"v"}', "application/json"), extra=extra)
    assert server.requests[0].body == b'{"version":"v","webhook":"http://cb"}'
    assert seen == [("request", "https://api.replicate.com/v1/predictions"),
                    ("response", "https://api.replicate.com/v1/predictions",
                     {"version": "v", "webhook": "http://cb"}, {"id": "pred-1"})]


async def test_response_hooks_run_only_after_2xx_and_their_failure_is_logged(server, client, caplog):
    calls = []

    async def broken(msg: Message, url: str, response: httpx.Response) -> None:
        calls.append(response.status_code)
        raise RuntimeError("store is down")

    server.script(Reply(500), Reply(200))
    with pytest.raises(DeliveryError):
        await post_message(client, server.url(), message(), extra={"response_hooks": [broken]})
    response = await post_message(client, server.url(), message(), extra={"response_hooks": [broken]})
    assert response.status_code == 200 and calls == [200]
    assert "response hook failed" in caplog.text
