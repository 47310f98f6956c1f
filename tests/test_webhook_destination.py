"""The webhook destination against a real HTTP server on loopback."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pydantic
import pytest

from destinations.registry import registry
from pipelines.components import ComponentContext, ComponentError, DeliveryError
from pipelines.message import Message

try:
    from tests.http_recorder import HTTPRecorder, Reply
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder, Reply

PNG_LIKE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def make(params: dict, context: ComponentContext):
    cls = registry.resolve("webhook", "v1")
    return cls(cls.Params.model_validate(params), context)


def msg(payload: bytes = PNG_LIKE, content_type: str = "image/png") -> Message:
    return Message.new(device_id="cam-7", project_id="farm", path="/images", content_type=content_type,
                       payload=payload, id="11111111-2222-4333-8444-555555555555",
                       timestamp=datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC))


@pytest.fixture
def server():
    with HTTPRecorder() as srv:
        yield srv


@pytest.fixture
async def client():
    async with httpx.AsyncClient() as c:
        yield c


def test_registered_as_v1_0_0():
    cls = registry.resolve("webhook", "v1.0.0")
    assert cls.type == "webhook" and cls.version == "1.0.0" and cls.kind == "destination"
    assert cls.summary


async def test_delivers_exact_bytes_and_headers(server, client):
    dest = make({"url": server.url("/in"), "headers": {"Authorization": "Bearer abc", "X-Extra": "1"}},
                ComponentContext(http=client))
    await dest.deliver(msg())
    [req] = server.requests
    assert req.path == "/in" and req.body == PNG_LIKE
    assert {k: req.headers[k] for k in ("Content-Type", "Ce-Specversion", "Ce-Id", "Ce-Source",
                                        "Ce-Subject", "Ce-Type", "Ce-Time", "Authorization", "X-Extra")} == {
        "Content-Type": "image/png", "Ce-Specversion": "1.0",
        "Ce-Id": "11111111-2222-4333-8444-555555555555", "Ce-Source": "cam-7", "Ce-Subject": "farm",
        "Ce-Type": "io.golioth.data.v1/.s/images", "Ce-Time": "2026-05-06T07:08:09Z",
        "Authorization": "Bearer abc", "X-Extra": "1",
    }


async def test_json_payload_from_a_previous_step_is_serialised_compactly(server, client):
    dest = make({"url": server.url()}, ComponentContext(http=client))
    m = msg(b"{}", "application/json").evolve(json={"version": "v", "input": {"image": "data:é"}})
    await dest.deliver(m)
    assert server.requests[0].body == '{"version":"v","input":{"image":"data:é"}}'.encode()
    assert server.requests[0].headers["Content-Type"] == "application/json"


async def test_one_attempt_per_call_failure_is_a_delivery_error(server, client):
    server.script(Reply(503, {"Retry-After": "3"}), Reply(200))
    dest = make({"url": server.url()}, ComponentContext(http=client))
    with pytest.raises(DeliveryError) as info:
        await dest.deliver(msg())
    assert info.value.retryable and info.value.status == 503 and info.value.retry_after == 3
    assert len(server.requests) == 1
    await dest.deliver(msg())  # the queue's next attempt
    assert len(server.requests) == 2


async def test_permanent_failure(server, client):
    server.script(Reply(400, body=b'{"detail":"bad input"}'))
    dest = make({"url": server.url()}, ComponentContext(http=client))
    with pytest.raises(DeliveryError) as info:
        await dest.deliver(msg())
    assert not info.value.retryable and info.value.response_excerpt == '{"detail":"bad input"}'


async def test_url_overrides_and_timeout_from_the_context(server, client):
    ctx = ComponentContext(http=client, extra={
        "url_overrides": {"https://api.replicate.com": server.url()}, "timeout": 0.3})
    dest = make({"url": "https://api.replicate.com/v1/predictions"}, ctx)
    await dest.deliver(msg())
    assert server.requests[0].path == "/v1/predictions"
    server.script(Reply(hang=True))
    with pytest.raises(DeliveryError) as info:
        await dest.deliver(msg())
    assert info.value.retryable and "timed out after 0.3 s" in info.value.reason


async def test_without_an_http_client_it_says_so():
    dest = make({"url": "http://127.0.0.1:9/"}, ComponentContext())
    with pytest.raises(ComponentError, match="HTTP client"):
        await dest.deliver(msg())


@pytest.mark.parametrize(("params", "fragment"), [
    ({}, "url"),
    ({"url": "ftp://example.org/x"}, "http"),
    ({"url": "/relative/path"}, "absolute"),
    ({"url": "http://example.org", "headers": {"X-N": 5}}, "headers"),
    ({"url": "http://example.org", "headers": ["a"]}, "headers"),
    ({"url": "http://example.org", "method": "PUT"}, "method"),
    ({"url": "http://example.org", "embed": True}, "embed"),
])
def test_bad_parameters_are_rejected_at_load_time(params, fragment):
    cls = registry.resolve("webhook", "v1")
    with pytest.raises(pydantic.ValidationError) as info:
        cls.Params.model_validate(params)
    assert fragment in str(info.value)


def test_url_error_does_not_repeat_the_url():
    cls = registry.resolve("webhook", "v1")
    with pytest.raises(pydantic.ValidationError) as info:
        cls.Params.model_validate({"url": "gopher://s3cr3t.example/"})
    assert all("s3cr3t" not in e["msg"] for e in info.value.errors())
