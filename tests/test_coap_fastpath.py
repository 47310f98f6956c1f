"""The Block1 fast path (``pipelines.ingest.coap_fastpath``): blocks with more to come answered
at the datagram, everything else left to aiocoap, with the same answers either way.

Raw datagrams over a bare UDP socket (built with aiocoap's encoder), aiocoap's client, and
libcoap's ``coap-client-openssl`` (plain and DTLS), all to a real ``CoapIngest`` on a real
``Router`` whose webhook posts to a real HTTP server recording what arrived.
"""

from __future__ import annotations

import asyncio
import random
import warnings
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code
from aiocoap.optiontypes import BlockOption
from dtls_env import HTTPRecorder, wait_for
from test_coap_ingest import KEY_01, LIBCOAP, libcoap, make_png, post_frame
from test_coap_robustness import (
    REGISTRY,
    Raw,
    block,
    datagram,
    delivered,
    expect_delivered,
    pipelines_yaml,
    with_option,
)

from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.ingest.coap_fastpath import Answer, encode_answer, parse_upload_block, uint
from pipelines.router import Router, RouterSettings


@pytest.fixture
def hook():
    with HTTPRecorder() as server:
        yield server


@pytest.fixture
def registry_path(tmp_path: Path) -> Path:
    path = tmp_path / "devices.yaml"
    path.write_text(REGISTRY)
    path.chmod(0o600)
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


async def receive_bytes(raw: Raw, timeout: float = 5.0) -> bytes:
    """The next datagram from the server (read in a thread: the server runs on this loop)."""
    raw.sock.settimeout(timeout)
    return await asyncio.to_thread(raw.sock.recv, 65536)


async def receive_any(raw: Raw, timeout: float = 5.0) -> aiocoap.Message:
    return aiocoap.Message.decode(await receive_bytes(raw, timeout))


# -- the parser agrees with aiocoap's ---------------------------------------------------------

OPTION_CHOICES = [
    ("uri_path", [".s"]), ("uri_path", [".s", "frames", "x"]), ("uri_path", [".d", "x"]), ("uri_path", []),
    ("uri_query", ["d=cam-01"]), ("uri_query", []), ("content_format", 23), ("content_format", None),
    ("content_format", 0), ("size1", 44_000), ("size1", None), ("request_tag", [b"\x01"]),
    ("request_tag", [b"ab", b""]), ("request_tag", []), ("uri_host", "example.com"), ("uri_port", 5683),
    ("uri_host", None), ("uri_port", None),
]


def test_parser_takes_exactly_what_aiocoap_decodes_the_same(capsys):
    """Random well-formed requests (aiocoap's encoder): the fast parser either declines or reads
    every field as aiocoap's decoder does; it declines all but POSTs to /.s with M = 1."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    taken = 0
    for i in range(3000):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            m = aiocoap.Message(mtype=rng.choice([aiocoap.CON, aiocoap.NON]), mid=rng.randrange(65536),
                                token=rng.randbytes(rng.randrange(9)),
                                code=rng.choice([Code.POST, Code.POST, Code.PUT, Code.GET]),
                                payload=rng.randbytes(rng.choice([0, 16, 1024])))
        for name, value in rng.sample(OPTION_CHOICES, 6):
            if value is not None:
                setattr(m.opt, name, value)
        if rng.random() < 0.9:
            m.opt.block1 = BlockOption.BlockwiseTuple(rng.randrange(3000), rng.random() < 0.8, rng.randrange(8))
        if rng.random() < 0.1:
            m.opt.no_response = 2
        data = m.encode()
        parsed = parse_upload_block(data)
        ref = aiocoap.Message.decode(data)
        eligible = (ref.code == Code.POST and ref.opt.block1 is not None and ref.opt.block1.more
                    and ref.opt.block1.size_exponent < 7 and list(ref.opt.uri_path[:1]) == [".s"]
                    and ref.opt.no_response is None)
        assert (parsed is not None) == eligible, (i, data.hex())
        if parsed is None:
            continue
        taken += 1
        assert (parsed.mid, parsed.token, parsed.payload) == (ref.mid, ref.token, ref.payload)
        assert parsed.mtype == (0 if ref.mtype == aiocoap.CON else 1)
        assert parsed.path == list(ref.opt.uri_path) and parsed.query == list(ref.opt.uri_query)
        assert parsed.content_format == ref.opt.content_format and parsed.size1 == ref.opt.size1
        assert parsed.request_tag == tuple(ref.opt.request_tag)
        assert (parsed.num, parsed.szx) == (ref.opt.block1.block_number, ref.opt.block1.size_exponent)
    assert taken > 100


@pytest.mark.parametrize("data", [
    b"", b"\x40\x02", bytes([0x40, 0x02, 0, 1, 0xBF]),                 # short, option length 15
    bytes([0x40, 0x02, 0, 1, 0xB2, 0x2E]),                             # option runs past the end
    bytes([0x40, 0x02, 0, 1, 0xB2, 0x2E, 0x73, 0xD1, 0x03, 0x18, 0xFF]),  # payload marker, no payload
    bytes([0x40, 0x02, 0, 1, 0xB2, 0xFF, 0xFE, 0xD1, 0x03, 0x18, 0xFF, 0x01]),  # Uri-Path not UTF-8
    bytes([0x49, 0x02, 0, 1]) + b"123456789",                          # token of 9 bytes
    bytes([0x80, 0x02, 0, 1]),                                         # version 2
])
def test_parser_declines_malformed_datagrams(data):
    assert parse_upload_block(data) is None


def test_answers_decode_as_coap():
    """A CON gets a piggybacked ACK (same message id and token), a NON a NON; options in order."""
    con = parse_upload_block(block(0x1234, b"tk", 3, True, b"x" * 1024))
    ack = aiocoap.Message.decode(encode_answer(con, Answer(95, [(27, uint(3 << 4 | 8 | 6))])))
    assert (ack.mtype, ack.mid, ack.token, ack.code) == (aiocoap.ACK, 0x1234, b"tk", Code.CONTINUE)
    assert ack.opt.block1 == (3, True, 6) and ack.payload == b""
    non = parse_upload_block(datagram(9, b"n", [".s", "x"], b"y" * 64, mtype=aiocoap.NON,
                                      block1=BlockOption.BlockwiseTuple(1, True, 2)))
    reply = aiocoap.Message.decode(encode_answer(non, Answer(163, [(60, uint(4 << 20)), (14, uint(2))], b"busy")))
    assert (reply.mtype, reply.token, reply.code) == (aiocoap.NON, b"n", Code.SERVICE_UNAVAILABLE)
    assert reply.opt.size1 == 4 << 20 and reply.opt.max_age == 2 and reply.payload == b"busy"


# -- over the wire ------------------------------------------------------------------------------

async def test_duplicate_con_block_gets_the_same_answer_and_is_appended_once(server, raw, hook):
    body = [b"a" * 1024, b"b" * 1024, b"c" * 1024, b"end"]
    assert (await raw.ask(block(1, b"t", 0, True, body[0]))).code == Code.CONTINUE
    raw.send(block(2, b"t", 1, True, body[1]))
    first = await receive_bytes(raw)
    raw.send(block(2, b"t", 1, True, body[1]))    # the ACK was lost, say: the device sends it again
    again = await receive_bytes(raw)
    assert again == first and aiocoap.Message.decode(first).code == Code.CONTINUE
    assert server.stats["fast_duplicates"] == 1
    assert (await raw.ask(block(3, b"t", 2, True, body[2]))).code == Code.CONTINUE
    done = await raw.ask(block(4, b"t", 3, False, body[3]))
    await expect_delivered(hook, done, b"".join(body))    # block 1 once: the body is exact
    assert server.stats["fast_blocks"] == 3               # blocks 0, 1, 2; the last one is aiocoap's


async def test_same_message_id_with_other_content_is_a_duplicate(server, raw, hook):
    """RFC 7252 §4.5: the message id makes the duplicate, as in aiocoap: a different block sent
    under a message id already answered gets the old answer and is not appended."""
    assert (await raw.ask(block(10, b"t", 0, True, b"0" * 1024))).code == Code.CONTINUE
    one = await raw.ask(block(11, b"t", 1, True, b"1" * 1024))
    reused = await raw.ask(block(11, b"t", 2, True, b"2" * 1024))
    assert reused.opt.block1 == one.opt.block1 == (1, True, 6)
    done = await raw.ask(block(12, b"t", 2, False, b"two"))
    await expect_delivered(hook, done, b"0" * 1024 + b"1" * 1024 + b"two")


async def test_out_of_order_block_gets_4_08_and_the_device_can_start_again(server, raw, hook):
    assert (await raw.ask(block(20, b"t", 0, True, b"0" * 1024))).code == Code.CONTINUE
    gap = await raw.ask(block(21, b"t", 2, True, b"2" * 1024))   # block 1 never came
    assert gap.code == Code.REQUEST_ENTITY_INCOMPLETE and b"out of order" in gap.payload
    late = await raw.ask(block(22, b"t", 1, True, b"1" * 1024))  # the upload was dropped
    assert late.code == Code.REQUEST_ENTITY_INCOMPLETE
    assert server.stats["refused_136"] == 2
    assert (await raw.ask(block(23, b"t", 0, True, b"A" * 1024))).code == Code.CONTINUE
    done = await raw.ask(block(24, b"t", 1, False, b"B"))
    await expect_delivered(hook, done, b"A" * 1024 + b"B")


async def test_non_blocks_get_non_answers_and_a_repeated_non_is_dropped(server, raw, hook):
    def non(mid: int, num: int, more: bool, payload: bytes) -> bytes:
        return datagram(mid, b"nn", [".s", "frames"], payload, cf=23, mtype=aiocoap.NON,
                        block1=BlockOption.BlockwiseTuple(num, more, 6))

    body = [b"x" * 1024, b"y" * 1024, b"z"]
    raw.send(non(30, 0, True, body[0]))
    first = await receive_any(raw)
    assert (first.mtype, first.code, first.token, first.opt.block1) == (aiocoap.NON, Code.CONTINUE, b"nn", (0, True, 6))
    raw.send(non(31, 1, True, body[1]))
    assert (await receive_any(raw)).opt.block1 == (1, True, 6)
    raw.send(non(31, 1, True, body[1]))          # the same NON again: dropped, not answered
    raw.send(non(32, 2, False, body[2]))         # answered after the repeat was handled
    last = await receive_any(raw)
    assert last.code == Code.CHANGED and last.mtype == aiocoap.NON
    await expect_delivered(hook, last, b"".join(body))
    assert server.stats["fast_duplicates"] == 1


@pytest.mark.parametrize(("number", "value", "code"), [
    (2052, b"x", Code.CONTINUE),           # an elective option it does not know: aiocoap's, ignored
    (258, b"\x00", Code.CONTINUE),         # No-Response: aiocoap's
    (2049, b"x", Code.BAD_OPTION),         # an unknown critical option: refused by the screening
])
async def test_blocks_with_other_options_go_to_aiocoap(server, raw, hook, number, value, code):
    assert (await raw.ask(block(40, b"t", 0, True, b"0" * 1024))).code == Code.CONTINUE
    fast = server.stats["fast_blocks"]
    answer = await raw.ask(with_option(block(41, b"t", 1, True, b"1" * 1024), number, value))
    assert answer.code == code
    assert server.stats["fast_blocks"] == fast     # not the fast path's
    if code == Code.CONTINUE:
        done = await raw.ask(block(42, b"t", 2, False, b"2"))
        await expect_delivered(hook, done, b"0" * 1024 + b"1" * 1024 + b"2")


async def test_uri_host_and_port_are_taken_but_not_twice(server, raw, hook):
    """libcoap sends Uri-Port (and Uri-Host for names): the fast path takes them, as the router
    ignores them; given twice they are aiocoap's (4.02, a non-repeatable critical option)."""
    assert (await raw.ask(with_option(block(45, b"h", 0, True, b"0" * 1024), 3, b"example.com"))).code == \
        Code.CONTINUE
    assert (await raw.ask(with_option(block(46, b"h", 1, True, b"1" * 1024), 7, b"\x16\x33"))).code == \
        Code.CONTINUE
    assert server.stats["fast_blocks"] == 2
    twice = with_option(with_option(block(47, b"h", 2, True, b"2" * 1024), 7, b"\x16\x33"), 7, b"\x16\x34")
    assert (await raw.ask(twice)).code == Code.BAD_OPTION
    assert server.stats["fast_blocks"] == 2
    done = await raw.ask(block(48, b"h", 2, False, b"2"))
    await expect_delivered(hook, done, b"0" * 1024 + b"1" * 1024 + b"2")


async def test_unnamed_device_and_bad_path_are_aiocoaps_answers(server, raw):
    """What the fast path declines (no ?d=, a path to refuse) gets aiocoap's answers, unchanged."""
    anon = await raw.ask(datagram(50, b"a", [".s", "x"], b"0" * 1024, query=(),
                                  block1=BlockOption.BlockwiseTuple(0, True, 6)))
    assert anon.code == Code.UNAUTHORIZED and b"?d=" in anon.payload
    bad = await raw.ask(datagram(51, b"b", [".s", ".."], b"0" * 1024, block1=BlockOption.BlockwiseTuple(0, True, 6)))
    assert bad.code == Code.BAD_REQUEST and b"'..'" in bad.payload
    assert server.stats["fast_blocks"] == 0


async def test_block_0_over_the_rate_limit_gets_4_29_and_is_counted(router, registry_path, hook):
    async with CoapIngest(router, settings(registry_path, rate_limit=1, rate_burst=1)) as srv:
        raw = Raw(srv.port)
        try:
            assert (await raw.ask(block(60, b"r", 0, True, b"0" * 1024, path="a"))).code == Code.CONTINUE
            assert (await raw.ask(block(61, b"r", 1, True, b"1" * 1024, path="a"))).code == Code.CONTINUE
            limited = await raw.ask(block(62, b"s", 0, True, b"0" * 1024, path="b"))
            assert limited.code == Code.TOO_MANY_REQUESTS and limited.opt.max_age >= 1
            assert b"cam-01" in limited.payload
            assert srv.server.rate_limited[("demo", "cam-01")] == 1
            assert srv.device_sessions()[("demo", "cam-01")]["rate_limited"] == 1
            done = await raw.ask(block(63, b"r", 2, False, b"2", path="a"))  # continuation: not limited
            await expect_delivered(hook, done, b"0" * 1024 + b"1" * 1024 + b"2")
        finally:
            raw.close()


SCRIPT = [  # (mid, token, num, more, payload, path): normal blocks, a repeat, a gap, a conflict, too big
    (70, b"a", 0, True, b"0" * 1024, "p"), (71, b"a", 1, True, b"1" * 1024, "p"),
    (72, b"a", 1, True, b"1" * 1024, "p"), (73, b"a", 2, False, b"end", "p"),
    (74, b"b", 0, True, b"0" * 1024, "q"), (75, b"b", 3, True, b"3" * 1024, "q"),
    (76, b"c", 0, True, b"0" * 1024, "r"), (77, b"d", 0, True, b"D" * 1024, "r"),
    (78, b"c", 1, True, b"1" * 1024, "r"), (79, b"c", 2, True, b"2" * 1024, "r"),
    (80, b"c", 3, True, b"3" * 1024, "r"), (81, b"c", 4, True, b"4" * 1024, "r"),
    (82, b"e", 0, True, b"0" * 256, "s"), (83, b"e", 1, True, b"1" * 1024, "s"),
]


async def test_same_answers_with_and_without_the_fast_path(router, registry_path, hook):
    """One script of blocks (a repeated block with a new message id, a gap, a second upload's
    block 0, the body limit, a short middle block) against the server with the fast path and
    without: code, options and payload of every answer are the same."""
    answers = {}
    for fast in (True, False):
        async with CoapIngest(router, settings(registry_path, fast_blocks=fast, max_body=4096)) as srv:
            raw = Raw(srv.port)
            try:
                got = []
                for mid, token, num, more, payload, path in SCRIPT:
                    a = await raw.ask(block(mid, token, num, more, payload, path=path))
                    got.append((a.code, a.mtype, a.token, a.opt.block1, a.opt.size1, a.opt.max_age,
                                a.payload if a.code != Code.CHANGED else b"(message id)"))
                answers[fast] = got
                assert (srv.stats.get("fast_blocks", 0) > 0) == fast
            finally:
                raw.close()
    assert answers[True] == answers[False]
    codes = [a[0] for a in answers[True]]
    assert Code.CONFLICT in codes and Code.REQUEST_ENTITY_INCOMPLETE in codes
    assert Code.REQUEST_ENTITY_TOO_LARGE in codes and Code.BAD_REQUEST in codes


async def test_aiocoap_client_upload_goes_the_fast_path(server, hook):
    frame = make_png(30_000, seed=7)
    ctx = await aiocoap.Context.create_client_context()
    try:
        answer = await post_frame(ctx, server.port, frame, szx=6)  # aiocoap: a new token per block
    finally:
        await ctx.shutdown()
    await expect_delivered(hook, answer, frame)
    assert server.stats["fast_blocks"] == -(-len(frame) // 1024) - 1


@pytest.mark.parametrize("dtls", [False, True])
async def test_libcoap_upload_goes_the_fast_path(router, registry_path, hook, tmp_path, dtls):
    assert LIBCOAP is not None, "coap-client-openssl not found: run ./dev setup (Debian libcoap3-bin)"
    frame = make_png(40_000, seed=11)
    f = tmp_path / "frame.png"
    f.write_bytes(frame)
    async with CoapIngest(router, settings(registry_path, dtls_enabled=dtls)) as srv:
        if dtls:
            args = ["-u", "cam-01@demo", "-k", KEY_01, f"coaps://127.0.0.1:{srv.dtls_port}/.s/images"]
        else:
            args = [f"coap://127.0.0.1:{srv.port}/.s/images?d=cam-01"]
        rc, out, err = await libcoap("-m", "post", "-b", "1024", "-f", str(f), "-t", "23", *args)
        assert rc == 0, err
        got = await wait_for(lambda: delivered(hook, out.decode().strip()), what="delivery")
        assert got.body == frame
        assert srv.stats["fast_blocks"] == -(-len(frame) // 1024) - 1


async def test_fast_path_over_dtls_answers_a_duplicate_through_the_session(router, registry_path, hook):
    """A re-sent CON block inside a DTLS session: the same answer again, appended once."""
    from dtls_peer import DtlsPeer

    async with CoapIngest(router, settings(registry_path, dtls_enabled=True, plain_enabled=False)) as srv:
        peer = DtlsPeer(srv.dtls_port)
        try:
            await peer.handshake(b"cam-01@demo", b"cam-01-secret")

            async def ask(data: bytes) -> bytes:
                peer.conn.send(data)
                for out in peer._out():
                    peer.send_raw(out)
                while True:
                    peer.conn.bio_write(await peer.recv_raw())
                    try:
                        return peer.conn.recv(65536)
                    except Exception:  # a record without application data: read on
                        continue

            def blk(mid: int, num: int, more: bool, payload: bytes) -> bytes:
                return datagram(mid, b"d", [".s", "frames"], payload, cf=23, query=(),
                                block1=BlockOption.BlockwiseTuple(num, more, 6))

            assert aiocoap.Message.decode(await ask(blk(1, 0, True, b"0" * 1024))).code == Code.CONTINUE
            first = await ask(blk(2, 1, True, b"1" * 1024))
            assert await ask(blk(2, 1, True, b"1" * 1024)) == first
            done = aiocoap.Message.decode(await ask(blk(3, 2, False, b"2")))
            await expect_delivered(hook, done, b"0" * 1024 + b"1" * 1024 + b"2")
            assert srv.stats["fast_blocks"] == 2 and srv.stats["fast_duplicates"] == 1
        finally:
            peer.close()


def test_prepared_answer_is_resent_by_aiocoaps_duplicate_handling():
    """Should a duplicate of a fast-answered message reach aiocoap, its table entry is re-sent
    like aiocoap's own answers (``_send_initially`` -> transport ``send`` -> ``encode``)."""
    from pipelines.ingest.coap_fastpath import PreparedAnswer

    sent = []

    class Transport:
        def send(self, message):
            sent.append(message.encode())

    from aiocoap.messagemanager import MessageManager
    manager = MessageManager.__new__(MessageManager)
    manager.message_interface = Transport()
    manager._recent_messages = {}
    manager.log = __import__("logging").getLogger("test")
    answer = PreparedAnswer(b"\x60\x5f\x00\x01", aiocoap.ACK, 1, ("127.0.0.1", 1))
    manager._send_initially(answer)
    assert sent == [b"\x60\x5f\x00\x01"]


async def test_dtls_session_takes_an_empty_datagram_and_goes_on(router, registry_path, hook):
    """The session's records are read through OpenSSL's binding directly: an empty datagram from
    the peer's address is counted as dropped (no traceback) and the session keeps serving."""
    from dtls_peer import DtlsPeer

    async with CoapIngest(router, settings(registry_path, dtls_enabled=True, plain_enabled=False)) as srv:
        peer = DtlsPeer(srv.dtls_port)
        try:
            await peer.handshake(b"cam-01@demo", b"cam-01-secret")
            peer.send_raw(b"")
            request = aiocoap.Message(code=Code.POST, uri_path=[".s", "after"], payload=b"still here")
            answer = await peer.request(request)
            await expect_delivered(hook, answer, b"still here")
            assert srv.dtls.stats["datagrams_dropped"] == 1 and srv.dtls.session_count == 1
        finally:
            peer.close()
