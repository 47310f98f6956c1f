"""The webhook transformer against a real HTTP server on loopback."""

from __future__ import annotations

import json
import socket

import httpx
import pydantic
import pytest

from pipelines.components import ComponentContext, TransformError
from pipelines.message import Message
from pipelines.retry import RetryPolicy
from transformers.registry import registry

try:
    from tests.http_recorder import HTTPRecorder, Reply
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from http_recorder import HTTPRecorder, Reply

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=4)
JSON = {"Content-Type": "application/json"}


def make(params: dict, context: ComponentContext):
    cls = registry.resolve("webhook", "v1")
    return cls(cls.Params.model_validate(params), context)


def msg(payload: bytes = b'{"temp": 32}', content_type: str = "application/json") -> Message:
    return Message.new(device_id="dev-9", project_id="proj-3", path="/sensor", content_type=content_type,
                       payload=payload)


@pytest.fixture
def server():
    with HTTPRecorder() as srv:
        yield srv


@pytest.fixture
async def client():
    async with httpx.AsyncClient() as c:
        yield c


async def test_golioth_example_response_becomes_the_message(server, client):
    server.script(Reply(200, {"Content-Type": "application/json; charset=utf-8"}, b'{"temp": 89.6}'))
    t = make({"url": server.url("/c2f"), "headers": {"x-api-key": "sup3rs3cr3t"}},
             ComponentContext(http=client, extra={"retry": FAST}))
    m = msg()
    out = await t.transform(m)
    [req] = server.requests
    assert req.path == "/c2f" and req.body == b'{"temp": 32}'
    assert req.headers["x-api-key"] == "sup3rs3cr3t"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Ce-Source"] == "dev-9" and req.headers["Ce-Subject"] == "proj-3"
    assert req.headers["Ce-Type"] == "io.golioth.data.v1/.s/sensor"
    assert req.headers["Ce-Id"] == m.id and req.headers["Ce-Specversion"] == "1.0"
    assert out.content_type == "application/json" and out.payload == b'{"temp": 89.6}'
    assert out.id == m.id and out.device_id == "dev-9" and out.path == "/sensor"


async def test_non_json_response_keeps_its_content_type_and_bytes(server, client):
    body = bytes(range(256))
    server.script(Reply(200, {"Content-Type": "audio/wav; rate=8000"}, body), Reply(200, {}, b"raw"))
    t = make({"url": server.url()}, ComponentContext(http=client))
    out = await t.transform(msg(b"\x00\x01", "application/octet-stream"))
    assert out.content_type == "audio/wav; rate=8000" and out.payload == body
    out = await t.transform(msg())
    assert out.content_type == "application/octet-stream" and out.payload == b"raw"


async def test_embed_with_json_in_and_out(server, client):
    server.script(Reply(200, JSON, b'{"label": "cat", "p": 0.9}'))
    t = make({"url": server.url(), "embed": True}, ComponentContext(http=client))
    out = await t.transform(msg())
    assert out.content_type == "application/json"
    assert json.loads(out.payload) == {"input": {"temp": 32}, "output": {"label": "cat", "p": 0.9}}


async def test_embed_without_json_input_gives_the_response_alone(server, client):
    server.script(Reply(200, JSON, b'{"text": "hello"}'))
    t = make({"url": server.url(), "embed": True}, ComponentContext(http=client))
    out = await t.transform(msg(b"\x01\x02", "application/octet-stream"))
    assert out.json() == {"text": "hello"}


async def test_embed_with_a_broken_json_response_fails(server, client):
    server.script(Reply(200, JSON, b'{"text": '))
    t = make({"url": server.url(), "embed": True}, ComponentContext(http=client))
    with pytest.raises(TransformError, match="response is not valid JSON"):
        await t.transform(msg())


async def test_retries_per_policy_then_succeeds(server, client):
    server.script(Reply(503), Reply(429, {"Retry-After": "0"}), Reply(200, JSON, b"[1]"))
    t = make({"url": server.url()}, ComponentContext(http=client, extra={"retry": FAST}))
    out = await t.transform(msg())
    assert out.json() == [1] and len(server.requests) == 3
    assert len({r.headers["Ce-Id"] for r in server.requests}) == 1


async def test_gives_up_after_max_attempts(server, client):
    server.default = Reply(502, body=b"bad gateway")
    policy = {"max_attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.01}
    t = make({"url": server.url("/x?key=s3cr3t")}, ComponentContext(http=client, extra={"retry": policy}))
    pattern = r"webhook: POST http://127\.0\.0\.1:\d+: HTTP 502 .*after 3 attempts"
    with pytest.raises(TransformError, match=pattern) as info:
        await t.transform(msg())
    assert len(server.requests) == 3 and "s3cr3t" not in str(info.value)
    assert str(info.value).endswith("(after 3 attempts): 'bad gateway'")


async def test_permanent_status_is_not_retried(server, client):
    server.script(Reply(400), Reply(200))
    t = make({"url": server.url()}, ComponentContext(http=client, extra={"retry": FAST}))
    with pytest.raises(TransformError, match=r"HTTP 400 .*\(permanent\) \(after 1 attempt\)"):
        await t.transform(msg())
    assert len(server.requests) == 1


async def test_connection_refused_fails_after_retries(client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        t = make({"url": url}, ComponentContext(http=client, extra={"retry": FAST}))
        with pytest.raises(TransformError, match=r"ConnectError.*after 4 attempts"):
            await t.transform(msg())


async def test_bare_context_opens_and_closes_its_own_client(server):
    server.script(Reply(200, JSON, b"{}"))
    t = make({"url": "https://api.example.test/v1"},
             ComponentContext(extra={"url_overrides": {"https://api.example.test": server.url()}}))
    assert (await t.transform(msg())).json() == {}
    assert server.requests[0].path == "/v1"
    own = t._own_client
    assert own is not None
    await t.close()
    assert own.is_closed and t._own_client is None


@pytest.mark.parametrize(("params", "fragment"), [
    ({}, "url"), ({"url": "mailto:x@y"}, "http"), ({"url": "http://h", "embed": "yes"}, "embed"),
    ({"url": "http://h", "headers": {"a": 1}}, "headers"), ({"url": "http://h", "verb": "GET"}, "verb"),
])
def test_bad_parameters(params, fragment):
    with pytest.raises(pydantic.ValidationError, match=fragment):
        registry.resolve("webhook").Params.model_validate(params)


def test_bad_retry_policy_in_context_is_a_validation_error():
    with pytest.raises(pydantic.ValidationError):
        from transformers.webhook import retry_policy
        retry_policy({"retry": {"max_attempts": 0}})


async def test_without_a_step_policy_a_dead_endpoint_costs_three_bounded_attempts(server, client):
    """A transformer call holds its pipeline run: by default it gives up after 3 attempts."""
    from transformers.webhook import TRANSFORMER_RETRY

    server.default = Reply(503, body=b"down")
    t = make({"url": server.url("/x")}, ComponentContext(http=client))
    with pytest.raises(TransformError, match="after 3 attempts"):
        await t.transform(msg())
    assert len(server.requests) == 3
    assert TRANSFORMER_RETRY.max_elapsed <= 30
