"""CoAP ingest under malformed and hostile datagrams (issue 17): a 2.04 is a promise that these
exact bytes are stored and can be delivered.

Datagrams are built here, raw: aiocoap's encoder for well-formed ones, bytes by hand for the
rest; they go through a bare UDP socket to a real ``CoapIngest`` on a real ``Router`` whose
webhook posts to a real HTTP server that records what arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import struct
import time
import warnings
from pathlib import Path

import aiocoap
import cbor2
import httpx
import pytest
from aiocoap import Code
from aiocoap.optiontypes import BlockOption
from dtls_env import HTTPRecorder, wait_for

from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.ingest.datagram_counts import DATAGRAMS
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from pipelines.service import RouterService, ServiceSettings

REGISTRY = "project_id: demo\ndevices:\n  - id: cam-01\n    psk: cam-01-secret\n"


# -- helpers -----------------------------------------------------------------------------

def datagram(mid: int, token: bytes, path: list[str], payload: bytes = b"", *, code=Code.POST,
             mtype=aiocoap.CON, query=("d=cam-01",), cf: int | None = 0, **opts) -> bytes:
    with warnings.catch_warnings():  # setting MID, type and token by hand is what we want here
        warnings.simplefilter("ignore", DeprecationWarning)
        m = aiocoap.Message(mtype=mtype, mid=mid, token=token, code=code, payload=payload)
    m.opt.uri_path = path
    m.opt.uri_query = list(query)
    if cf is not None:
        m.opt.content_format = cf
    for name, value in opts.items():
        setattr(m.opt, name, value)
    return m.encode()


def with_option(data: bytes, number: int, value: bytes) -> bytes:
    """``data`` (a message without payload marker issues) with one more raw option appended:
    re-encoded through aiocoap's option table so deltas stay right."""
    m = aiocoap.Message.decode(data)
    from aiocoap.options import OptionNumber
    from aiocoap.optiontypes import OpaqueOption
    m.opt.add_option(OpaqueOption(OptionNumber(number), value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = aiocoap.Message(mtype=m.mtype, mid=m.mid, token=m.token, code=m.code, payload=m.payload)
    out.opt = m.opt
    return out.encode()


class Raw:
    """A bare UDP socket to the server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.addr = ("127.0.0.1", port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.addr)

    def _receive(self, mid: int | None, timeout: float, token: bytes | None = None) -> aiocoap.Message | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            msg = aiocoap.Message.decode(data)
            if (mid is None or msg.mid == mid) and (token is None or msg.token == token):
                return msg
        return None

    async def receive(self, mid: int | None = None, timeout: float = 10.0) -> aiocoap.Message:
        msg = await asyncio.to_thread(self._receive, mid, timeout)
        assert msg is not None, f"no answer with message id {mid} in {timeout} s"
        return msg

    async def burst(self, datagrams: list[bytes]) -> None:
        """Send from a thread, so the server (on this event loop) reads while they arrive."""
        def run() -> None:
            for i, d in enumerate(datagrams):
                self.sock.sendto(d, self.addr)
                if i % 50 == 49:
                    time.sleep(0.002)  # the kernel's receive queue is some 200 KB
        await asyncio.to_thread(run)

    async def ask(self, data: bytes, attempts: int = 4) -> aiocoap.Message:
        """Send and wait for the answer with this message id, retransmitting as CoAP does (the
        server answers a retransmission from its exchange cache)."""
        mid = struct.unpack_from("!H", data, 2)[0]
        token = data[4:4 + (data[0] & 0x0F)] if data[0] >> 4 == 0x4 else None  # a CON: ACK has its token
        for _ in range(attempts):
            self.send(data)
            msg = await asyncio.to_thread(self._receive, mid, 2.0, token)
            if msg is not None:
                return msg
        raise AssertionError(f"no answer with message id {mid} after {attempts} attempts")

    def close(self) -> None:
        self.sock.close()


def delivered(hook: HTTPRecorder, message_id: str):
    return next((r for r in hook.requests if r.headers.get("Ce-Id") == message_id), None)


async def expect_delivered(hook: HTTPRecorder, answer: aiocoap.Message, body: bytes):
    assert answer.code == Code.CHANGED, (answer.code, answer.payload)
    got = await wait_for(lambda: delivered(hook, answer.payload.decode()), what="delivery")
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(body).hexdigest()
    return got


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture
def registry_path(tmp_path: Path) -> Path:
    path = tmp_path / "devices.yaml"
    path.write_text(REGISTRY)
    return path


def pipelines_yaml(tmp_path: Path, hook: HTTPRecorder) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(f"""\
pipelines:
  everything:
    steps:
      - name: out
        destination: {{type: webhook, version: v1, parameters: {{url: "{hook.url('/hook')}"}}}}
""")
    return path


@pytest.fixture
async def router(tmp_path: Path, hook: HTTPRecorder):
    settings = RouterSettings(pipelines=[pipelines_yaml(tmp_path, hook)], store_path=tmp_path / "s.db")
    async with Router(settings) as r:
        yield r


def settings(registry_path: Path, **kw) -> CoapSettings:
    base = dict(host="127.0.0.1", port=0, dtls_port=0, plain_enabled=True, dtls_enabled=False,
                registry_path=registry_path, rate_limit=0)
    base.update(kw)
    return CoapSettings(**base)


@pytest.fixture
async def server(router, registry_path: Path):
    async with CoapIngest(router, settings(registry_path)) as srv:
        yield srv


@pytest.fixture
def raw(server):
    r = Raw(server.port)
    yield r
    r.close()


# -- 1. datagrams over 4,096 bytes ----------------------------------------------------------

@pytest.mark.parametrize("size", [4_097, 8_000, 65_000])
async def test_big_single_datagram_is_delivered_whole(server, raw, hook, size):
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    answer = await raw.ask(datagram(100, b"big", [".s", "big"], body, cf=42))
    got = await expect_delivered(hook, answer, body)
    assert len(got.body) == size


async def test_truncated_datagram_gets_4_13_with_size1_and_block1_hint(router, registry_path, hook):
    async with CoapIngest(router, settings(registry_path, max_datagram=2048, max_block_szx=5)) as srv:
        raw = Raw(srv.port)
        try:
            before = DATAGRAMS.counts().get("truncated", 0)
            answer = await raw.ask(datagram(101, b"t", [".s", "big"], b"y" * 3000))
            assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE
            assert answer.mtype == aiocoap.ACK and answer.token == b"t"
            assert answer.opt.size1 == 2048
            assert answer.opt.block1 == (0, False, 5)
            assert DATAGRAMS.counts()["truncated"] == before + 1
            ok = await raw.ask(datagram(102, b"s", [".s", "small"], b"z" * 1000))
            await expect_delivered(hook, ok, b"z" * 1000)
            assert srv.stats["accepted"] == 1  # the truncated one never reached the pipelines
        finally:
            raw.close()


# -- 2. what a path may hold -------------------------------------------------------------------

async def test_non_ascii_paths_are_delivered_percent_encoded(server, raw, hook):
    for i, segment in enumerate(["café", "温度", "🌡️", "a%20b"]):
        answer = await raw.ask(datagram(200 + i, b"p", [".s", segment], b"v%d" % i))
        got = await expect_delivered(hook, answer, b"v%d" % i)
        encoded = "".join(c if 0x21 <= ord(c) <= 0x7E and c not in '"%' else
                          "".join(f"%{b:02X}" for b in c.encode()) for c in segment)
        assert got.headers["Ce-Type"] == f"io.golioth.data.v1/.s/{encoded}"


@pytest.mark.parametrize(("segment", "why"), [
    ("a\x00b", "U+0000"), ("a\r\nb", "U+000D"), ("a b", "U+0020"), ("x\u200by", "U+200B"),
    ("a+b", "'+'"), ("#", "'#'"), (".", "'.'"), ("..", "'..'"), ("\ue000", "U+E000"),
])
async def test_unusable_path_is_refused_with_a_reason(server, raw, hook, segment, why):
    answer = await raw.ask(datagram(300, b"q", [".s", "ok", segment], b"never"))
    assert answer.code == Code.BAD_REQUEST
    assert why in answer.payload.decode()
    assert server.stats["accepted"] == 0


async def test_long_path_is_refused(server, raw):
    answer = await raw.ask(datagram(301, b"q", [".s"] + ["é" * 40] * 4, b"never"))
    assert answer.code == Code.BAD_REQUEST and b"bytes of UTF-8" in answer.payload


async def test_stored_message_with_control_characters_in_path_still_delivers(router, hook):
    """A message stored before paths were checked (a dead letter to replay, say) is delivered:
    the path is percent-encoded in Ce-Type, not a 'request could not be built' failure."""
    msg = Message.new(device_id="cam-01", project_id="demo", path="/caf\u00e9\x00\r\nx",
                      content_type="text/plain", payload=b"old")
    await router.accept(msg)
    got = await wait_for(lambda: delivered(hook, msg.id), what="delivery")
    assert got.headers["Ce-Type"] == "io.golioth.data.v1/.s/caf%C3%A9%00%0D%0Ax"
    assert got.body == b"old"


async def test_dead_letter_with_such_a_path_replays_and_delivers(router, hook):
    """A dead letter of such a message (as the old code made them: "request could not be
    built") is delivered when replayed."""
    from http_recorder import Reply
    hook.script(Reply(400))  # the first attempt fails for good: a dead letter
    msg = Message.new(device_id="cam-01", project_id="demo", path="/🌡️/a\rb",
                      content_type="text/plain", payload=b"replay me")
    await router.accept(msg)
    letters = await wait_for_async(lambda: router.store.dead_letters(), what="a dead letter")
    assert await router.replay_dead_letter(letters[0].id)
    got = await wait_for(lambda: next((r for r in hook.requests[1:] if r.headers.get("Ce-Id") == msg.id), None),
                         what="the replayed delivery")
    assert got.body == b"replay me"
    assert got.headers["Ce-Type"] == "io.golioth.data.v1/.s/%F0%9F%8C%A1%EF%B8%8F/a%0Db"


async def wait_for_async(fetch, timeout: float = 10.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await fetch()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 3. state documents ------------------------------------------------------------------------

async def put_state(raw: Raw, mid: int, path: list[str], payload: bytes, cf: int = 50, **opts):
    return await raw.ask(datagram(mid, b"st", [".d", *path], payload, code=Code.PUT, cf=cf, **opts))


async def get_state(raw: Raw, mid: int, path: list[str], accept: int | None = None):
    opts = {} if accept is None else {"accept": accept}
    return await raw.ask(datagram(mid, b"gt", [".d", *path], code=Code.GET, cf=None, **opts))


@pytest.mark.parametrize(("payload", "cf", "why"), [
    (b'"\\ud800"', 50, b"surrogate"),
    (b'{"a":"x\\udfff"}', 50, b"surrogate"),
    (b"NaN", 50, b"NaN"),
    (b'{"t": Infinity}', 50, b"Infinity"),
    (b"1e400", 50, b"finite"),
    (b"[" * 900 + b"]" * 900, 50, b"nested"),
    (b"[" * 5000 + b"]" * 5000, 50, b"nested"),
    (cbor2.dumps(b"\x00\x01"), 60, b"byte string"),
    (cbor2.dumps({"u": cbor2.undefined}), 60, b"undefined"),
    (cbor2.dumps({1: "one"}), 60, b"not text"),
    (cbor2.dumps({"s": {1, 2}}), 60, b"set"),
    (cbor2.dumps(cbor2.CBORTag(99, "x")), 60, b"tag 99"),
    (cbor2.dumps(2 ** 70), 60, b"64 bits"),
    (cbor2.dumps(float("nan")), 60, b"finite"),
    (b"\xff\xfe", 50, b"not valid JSON"),
])
async def test_state_writes_json_cannot_hold_are_refused(server, raw, payload, cf, why):
    answer = await put_state(raw, 400, ["b"], payload, cf)
    assert answer.code == Code.BAD_REQUEST, (answer.code, answer.payload)
    assert why in answer.payload, answer.payload
    doc = await get_state(raw, 401, [""])
    assert doc.code == Code.CONTENT and json.loads(doc.payload) == {}


async def test_cbor_datetime_is_stored_as_rfc3339_text(server, raw):
    import datetime as dt
    when = dt.datetime(2026, 12, 4, 15, 0, 0, tzinfo=dt.UTC)
    answer = await put_state(raw, 410, ["seen"], cbor2.dumps({"at": when}, datetime_as_timestamp=True), 60)
    assert answer.code == Code.CHANGED
    doc = await get_state(raw, 411, ["seen"])
    assert json.loads(doc.payload) == {"at": "2026-12-04T15:00:00Z"}


async def test_poisoned_stored_document_is_served_and_observers_keep_hearing(server, router):
    """A document stored before writes were checked (here: written straight into the store)."""
    await router.set_state("demo", "cam-01", "/b", "\ud800")
    await router.set_state("demo", "cam-01", "/n", float("nan"))
    client = await aiocoap.Context.create_client_context()
    try:
        base = f"coap://127.0.0.1:{server.port}/.d"
        r = await client.request(aiocoap.Message(code=Code.GET, uri=f"{base}/b?d=cam-01")).response
        assert r.code == Code.CONTENT and json.loads(r.payload) == "\ufffd"
        r = await client.request(aiocoap.Message(code=Code.GET, uri=f"{base}/?d=cam-01")).response
        assert r.code == Code.CONTENT and json.loads(r.payload) == {"b": "\ufffd", "n": None}
        r = await client.request(aiocoap.Message(code=Code.GET, uri=f"{base}/?d=cam-01", accept=60)).response
        assert r.code == Code.CONTENT and cbor2.loads(r.payload) == {"b": "\ufffd", "n": None}
        obs = client.request(aiocoap.Message(code=Code.GET, uri=f"{base}/b?d=cam-01", observe=0))
        first = await obs.response
        assert first.code == Code.CONTENT
        updates = obs.observation.__aiter__()
        await router.set_state("demo", "cam-01", "/b", "\udc00 again")   # poisoned again
        assert json.loads((await asyncio.wait_for(updates.__anext__(), 10)).payload) == "\ufffd again"
        put = aiocoap.Message(code=Code.PUT, uri=f"{base}/b?d=cam-01", payload=b'"fine"', content_format=50)
        assert (await client.request(put).response).code == Code.CHANGED
        assert json.loads((await asyncio.wait_for(updates.__anext__(), 10)).payload) == "fine"
        obs.observation.cancel()
    finally:
        await client.shutdown()


# -- 4. undecodable datagrams --------------------------------------------------------------

async def test_undecodable_uri_path_is_answered_counted_and_logged_once(server, raw, hook, caplog):
    caplog.set_level(logging.WARNING)
    before = DATAGRAMS.counts().get("undecodable_option", 0)
    bad = bytes([0x40, 0x02, 0x12, 0x34, 0xB1, 0xFF])  # CON POST, Uri-Path = one byte 0xFF
    answer = await raw.ask(bad)
    assert answer.code == Code.BAD_OPTION and answer.mtype == aiocoap.ACK and b"UTF-8" in answer.payload
    # NON: counted and answered 4.02 without a traceback each
    await raw.burst([bytes([0x50, 0x02]) + struct.pack("!H", i) + b"\xb1\xff" for i in range(300)])
    ok = await raw.ask(datagram(9999, b"ok", [".s", "after"], b"still here"))
    await expect_delivered(hook, ok, b"still here")
    await wait_for(lambda: DATAGRAMS.counts()["undecodable_option"] >= before + 301, what="counts")
    records = [r for r in caplog.records if "refused datagrams" in r.getMessage() or r.levelno >= logging.ERROR]
    assert len(records) <= 1, [r.getMessage() for r in records]
    assert not [r for r in caplog.records if r.exc_info]


async def test_unparsable_con_gets_rst_and_metrics_count_it(server, raw, router, hook):
    before = DATAGRAMS.counts().get("unparsable", 0)
    raw.send(bytes([0x40, 0x02, 0x22, 0x22, 0xF0]))  # option delta 15 without payload marker
    rst = await raw.receive(0x2222)
    assert rst.mtype == aiocoap.RST and rst.code == Code.EMPTY
    from pipelines.metrics import RouterMetrics
    text, _ = await RouterMetrics(router).render()
    line = next(ln for ln in text.decode().splitlines()
                if ln.startswith('pipeline_coap_datagrams_refused_total{reason="unparsable"}'))
    assert float(line.split()[-1]) >= before + 1


# -- 6. protocol corners ------------------------------------------------------------------------

@pytest.mark.parametrize(("number", "value", "code"), [
    (2049, b"x", Code.BAD_OPTION), (9, b"", Code.BAD_OPTION), (19, b"\x08", Code.BAD_OPTION),
    (35, b"coap://elsewhere/x", Code.PROXYING_NOT_SUPPORTED), (39, b"coap", Code.PROXYING_NOT_SUPPORTED),
])
async def test_unknown_critical_and_proxy_options(server, raw, number, value, code):
    answer = await raw.ask(with_option(datagram(500, b"o", [".s", "x"], b"no"), number, value))
    assert answer.code == code, answer
    answer = await raw.ask(with_option(datagram(501, b"o", [".d", "x"], b"1", code=Code.PUT, cf=50),
                                       number, value))
    assert answer.code == code
    assert server.stats["accepted"] == 0


async def test_elective_unknown_option_is_ignored(server, raw, hook):
    answer = await raw.ask(with_option(datagram(502, b"e", [".s", "x"], b"yes"), 2048, b"x"))
    await expect_delivered(hook, answer, b"yes")


async def test_repeated_block1_is_refused(server, raw):
    data = datagram(503, b"r", [".s", "x"], b"a" * 64, block1=BlockOption.BlockwiseTuple(0, True, 2))
    data = with_option(data, 27, bytes([0x1A]))  # a second Block1 (num 1, more, szx 2)
    answer = await raw.ask(data)
    assert answer.code == Code.BAD_OPTION and b"27" in answer.payload
    assert len(server.server.uploads) == 0


async def test_if_none_match_and_if_match_on_state(server, raw):
    assert (await put_state(raw, 600, ["c"], b"1", if_none_match=True)).code == Code.CHANGED
    again = await put_state(raw, 601, ["c"], b"2", if_none_match=True)
    assert again.code == Code.PRECONDITION_FAILED
    assert (await put_state(raw, 602, ["missing"], b"1", if_match=[b""])).code == Code.PRECONDITION_FAILED
    assert (await put_state(raw, 603, ["c"], b"3", if_match=[b""])).code == Code.CHANGED
    got = await get_state(raw, 604, ["c"])
    assert json.loads(got.payload) == 3 and got.opt.etag
    assert (await put_state(raw, 605, ["c"], b"4", if_match=[b"stale123"])).code == Code.PRECONDITION_FAILED
    assert (await put_state(raw, 606, ["c"], b"4", if_match=[got.opt.etag])).code == Code.CHANGED
    assert json.loads((await get_state(raw, 607, ["c"])).payload) == 4


async def test_metrics_endpoint_shows_coap_refusals(tmp_path, registry_path, hook):
    """The counters are on the service's /metrics page, as an operator scrapes them."""
    svc_settings = ServiceSettings(router=RouterSettings(pipelines=[pipelines_yaml(tmp_path, hook)],
                                                         store_path=tmp_path / "m.db"),
                                   http_port=0, coap=settings(registry_path))
    async with RouterService(svc_settings) as svc:
        raw = Raw(svc.coap_port)
        try:
            raw.send(bytes([0x40, 0x02, 0x33, 0x33, 0xB1, 0xFF]))
            await raw.receive(0x3333)
        finally:
            raw.close()
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{svc.http_url}/metrics")).text
    assert 'pipeline_coap_datagrams_refused_total{reason="undecodable_option"}' in text


# -- 6. Block1 without Request-Tag: tokens ---------------------------------------------------

def block(mid: int, token: bytes, num: int, more: bool, payload: bytes, szx: int = 6,
          path: str = "frames", cf: int = 23) -> bytes:
    return datagram(mid, token, [".s", path], payload, cf=cf, block1=BlockOption.BlockwiseTuple(num, more, szx))


async def test_same_token_client_restart_with_new_token_replaces_the_stale_upload(server, raw, hook):
    """The Golioth SDK keeps one token per upload and restarts a failed upload with a new one."""
    old = [b"o" * 1024, b"p" * 1024]
    assert (await raw.ask(block(1, b"tok-old", 0, True, old[0]))).code == Code.CONTINUE
    assert (await raw.ask(block(2, b"tok-old", 1, True, old[1]))).code == Code.CONTINUE
    new = [b"o" * 1024, b"N" * 1024, b"end"]  # block 0 even equal to the old one's
    assert (await raw.ask(block(3, b"tok-new", 0, True, new[0]))).code == Code.CONTINUE
    late = await raw.ask(block(4, b"tok-old", 2, False, b"old tail"))  # the old upload's late block
    assert late.code == Code.CONFLICT and b"Request-Tag" in late.payload
    assert (await raw.ask(block(5, b"tok-new", 1, True, new[1]))).code == Code.CONTINUE
    done = await raw.ask(block(6, b"tok-new", 2, False, new[2]))
    await expect_delivered(hook, done, b"".join(new))
    assert server.stats["accepted"] == 1


async def test_second_upload_with_equal_block_0_is_never_merged(server, raw, hook):
    """Two uploads from one endpoint to one path without Request-Tag, each client keeping its
    token, block 0 byte-identical: the bodies never mix; what gets 2.04 is exactly one body."""
    head = b"H" * 1024
    a = [head, b"A" * 1024, b"a-end"]
    b = [head, b"B" * 1024, b"b-end"]
    answers = {}
    order = [("a", 0), ("a", 1), ("b", 0), ("a", 2), ("b", 1), ("b", 2)]
    for mid, (who, n) in enumerate(order, 10):
        body = a if who == "a" else b
        answers[(who, n)] = await raw.ask(block(mid, b"tok-" + who.encode(), n, n < 2, body[n]))
    # b's block 0 started b's own upload (it was not taken for a repeat of a's block 0): the
    # newer upload wins, a's late block is told why (4.09), and b is delivered whole
    assert answers[("b", 0)].code == Code.CONTINUE
    assert answers[("a", 2)].code == Code.CONFLICT and b"Request-Tag" in answers[("a", 2)].payload
    await expect_delivered(hook, answers[("b", 2)], b"".join(b))
    assert server.stats["accepted"] == 1


async def test_new_token_per_block_client_cannot_start_a_second_upload_at_once(server, raw, hook):
    """aiocoap takes a new token per block: a different block 0 while an upload is active is a
    collision (4.09), and the first upload completes whole."""
    assert (await raw.ask(block(30, b"t1", 0, True, b"1" * 1024))).code == Code.CONTINUE
    assert (await raw.ask(block(31, b"t2", 1, True, b"2" * 1024))).code == Code.CONTINUE
    other = await raw.ask(block(32, b"t3", 0, True, b"X" * 1024))
    assert other.code == Code.CONFLICT
    done = await raw.ask(block(33, b"t4", 2, False, b"3"))
    await expect_delivered(hook, done, b"1" * 1024 + b"2" * 1024 + b"3")


# -- 5. memory that stays -----------------------------------------------------------------------

async def test_exchange_memory_does_not_outlive_its_table(router, registry_path, hook):
    """Each acknowledged block left a 247 s timer (holding the remote) and its whole request
    (a 1 KB payload) behind the cached response; the table now expires its own entries."""
    async with CoapIngest(router, settings(registry_path, max_recent_exchanges=50)) as srv:
        raw = Raw(srv.port)
        try:
            loop = asyncio.get_running_loop()
            def live_timers() -> int:  # the event loop's pending timers
                return sum(not h.cancelled() for h in loop._scheduled)
            timers_before = live_timers()
            for i in range(200):  # 200 half uploads from one endpoint, each to its own path
                answer = await raw.ask(block(1000 + i, b"m%d" % i, 0, True, bytes([i % 256]) * 1024,
                                             path=f"p{i}"))
                assert answer.code == Code.CONTINUE
            assert live_timers() < timers_before + 20
            table = srv.exchange_tables[0]
            assert len(table) <= 50
            assert all(v is None or v.request is None for v in table.values())
            table.expire(now=time.monotonic() + 300)  # after EXCHANGE_LIFETIME
            assert len(table) == 0
            # the newest retransmission is still answered from the cache before that
        finally:
            raw.close()


async def test_single_datagrams_count_against_the_upload_memory_cap(router, registry_path, hook):
    async with CoapIngest(router, settings(registry_path, max_held_bytes=3000)) as srv:
        raw = Raw(srv.port)
        try:
            assert (await raw.ask(block(1, b"h", 0, True, b"h" * 1024))).code == Code.CONTINUE
            assert (await raw.ask(block(2, b"h", 1, True, b"h" * 1024))).code == Code.CONTINUE
            big = await raw.ask(datagram(3, b"b", [".s", "big"], b"B" * 2000))
            assert big.code == Code.SERVICE_UNAVAILABLE and big.opt.max_age == 2
            small = await raw.ask(datagram(4, b"s", [".s", "small"], b"s" * 500))
            await expect_delivered(hook, small, b"s" * 500)
            assert srv.server.uploads.held_bytes == 2048
        finally:
            raw.close()


# -- libcoap's client against the same rules ------------------------------------------------------

async def test_libcoap_client_sees_the_same_answers(server, hook):
    """libcoap percent-decodes the URI into Uri-Path: a non-ASCII path is delivered, a NUL is
    refused with the reason; a NaN state and an unknown critical option are refused."""
    import shutil
    libcoap = shutil.which("coap-client-openssl")
    assert libcoap, "coap-client-openssl (libcoap3-bin) is installed by ./dev"
    base = f"coap://127.0.0.1:{server.port}"

    async def run(*args: str) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(libcoap, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return out.decode().strip(), err.decode().strip()

    message_id, _ = await run("-m", "post", "-e", "from libcoap", f"{base}/.s/caf%C3%A9?d=cam-01")
    got = await wait_for(lambda: delivered(hook, message_id), what="delivery")
    assert got.body == b"from libcoap" and got.headers["Ce-Type"] == "io.golioth.data.v1/.s/caf%C3%A9"
    _, err = await run("-m", "post", "-e", "x", f"{base}/.s/a%00b?d=cam-01")
    assert err.startswith("4.00") and "U+0000" in err
    _, err = await run("-m", "put", "-e", "NaN", "-t", "50", f"{base}/.d/x?d=cam-01")
    assert err.startswith("4.00") and "NaN" in err
    _, err = await run("-m", "post", "-e", "x", "-O", "2049,x", f"{base}/.s/a?d=cam-01")
    assert err.startswith("4.02")
    assert server.stats["accepted"] == 1


def test_screen_is_usable_by_any_transport():
    """``screen`` (what the DTLS transport calls per decrypted datagram) answers without a socket."""
    from pipelines.ingest.coap_datagrams import screen
    out = screen(bytes([0x40, 0x02, 0x12, 0x34, 0xB1, 0xFF]), None, None)
    answer = aiocoap.Message.decode(out.reply)
    assert out.message is None and answer.code == Code.BAD_OPTION and answer.mid == 0x1234
    out = screen(bytes([0x40, 0x02, 0x12, 0x35, 0xF0]), None, None)      # format error in a CON
    assert aiocoap.Message.decode(out.reply).mtype == aiocoap.RST
    out = screen(datagram(7, b"t", [".s", "x"], b"y" * 100), None, None, truncated=True, max_datagram=64)
    answer = aiocoap.Message.decode(out.reply)
    assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE and answer.opt.size1 == 64 and answer.opt.block1
    good = datagram(8, b"g", [".s", "x"], b"fine")
    assert screen(good, None, None).message.payload == b"fine"


# -- the same checks inside DTLS ------------------------------------------------------------------

async def test_dtls_screens_decrypted_datagrams_like_plain_coap(router, registry_path, hook):
    """An undecodable Uri-Path and an unknown critical option inside a DTLS session are answered
    4.02 through the session (not dropped, no traceback), and the session goes on serving."""
    from dtls_peer import DtlsPeer

    async with CoapIngest(router, settings(registry_path, dtls_enabled=True, plain_enabled=False)) as srv:
        peer = DtlsPeer(srv.dtls_port)
        try:
            await peer.handshake(b"cam-01@demo", b"cam-01-secret")

            async def ask(data: bytes) -> aiocoap.Message:
                peer.conn.send(data)
                for out in peer._out():
                    peer.send_raw(out)
                while True:
                    peer.conn.bio_write(await peer.recv_raw())
                    try:
                        return aiocoap.Message.decode(peer.conn.recv(65536))
                    except Exception:  # a record without application data: read on
                        continue

            before = DATAGRAMS.counts().get("undecodable_option", 0)
            bad = await ask(bytes([0x41, 0x02, 0x00, 0x07, 0x75, 0xB1, 0xFF]))   # token "u", Uri-Path 0xFF
            assert bad.code == Code.BAD_OPTION and bad.mid == 7 and bad.token == b"u"
            assert DATAGRAMS.counts()["undecodable_option"] == before + 1
            opt = await ask(with_option(datagram(8, b"o", [".s", "x"], b"no", query=()), 2049, b"x"))
            assert opt.code == Code.BAD_OPTION and b"2049" in opt.payload
            ok = await ask(datagram(9, b"k", [".s", "after"], b"still served", query=()))
            await expect_delivered(hook, ok, b"still served")
        finally:
            peer.close()
