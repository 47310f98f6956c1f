"""Thousands of random and mutated datagrams against a running ``pipeline serve`` (plain CoAP).

Seeded (``COAP_FUZZ_SEED`` to replay; the seed is printed). Afterwards the router must still
serve, its RSS must stay within a bound, its log must not hold a traceback per datagram, and
every message it acknowledged (2.04 carrying a message id) must reach the real HTTP sink with
the sha256 of the payload of a datagram the test sent with that message id and token.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct
import sys
import threading
import time
import warnings
from pathlib import Path

import aiocoap
from aiocoap import Code
from delivery_sink import Sink
from test_delivery_faults import write_pipelines

ROOT = Path(__file__).resolve().parents[1]
DATAGRAMS = 4000
RSS_BOUND_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def valid_post(rng: random.Random, mid: int) -> bytes:
    token = rng.randbytes(rng.randint(0, 8))
    payload = rng.randbytes(rng.choice([0, 1, 10, 500, 1500, 5000]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = aiocoap.Message(mtype=rng.choice([aiocoap.CON, aiocoap.CON, aiocoap.NON]), mid=mid,
                            token=token, code=Code.POST, payload=payload)
    m.opt.uri_path = [".s", "fuzz", rng.choice(["a", "b", "café"])]
    m.opt.uri_query = [f"d=dev-{rng.randrange(400)}"]
    if rng.random() < 0.7:
        m.opt.content_format = rng.choice([0, 42, 50, 60, 23, 9999])
    return m.encode()


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 3 and len(b) > 4:
            i = rng.randrange(4, len(b))
            b[i] = rng.choice([0xFF, 0xF0, 0x0F, 0xD0, 0xE0, 0xB1])
        else:
            b[4:4] = rng.randbytes(rng.randint(1, 6))
    return bytes(b)


def generate(rng: random.Random) -> list[bytes]:
    out = []
    for i in range(DATAGRAMS):
        kind = rng.random()
        if kind < 0.3:
            out.append(valid_post(rng, i))
        elif kind < 0.8:
            out.append(mutate(rng, valid_post(rng, i)))
        else:
            out.append(rng.randbytes(rng.randint(0, 80)))
    return out


def decode(data: bytes) -> aiocoap.Message | None:
    try:
        return aiocoap.Message.decode(data)
    except Exception:
        return None


async def test_random_and_mutated_datagrams(tmp_path: Path) -> None:
    seed = int(os.environ.get("COAP_FUZZ_SEED") or random.randrange(2 ** 32))
    print(f"\nCOAP_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    datagrams = generate(rng)
    with Sink() as sink:
        pf = write_pipelines(tmp_path, [{"name": "sink", "url": sink.url("/in"),
                                         "retry": {"initial_backoff": 0.05, "max_backoff": 0.2}}])
        log = tmp_path / "router.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pipelines.cli", "serve", "--pipelines", str(pf),
                "--store", str(tmp_path / "store.db"), "--http-port", "0", "--coap-port", "0",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "coap://" in line, f"router did not start: {line!r}; see {log}"
            port = int(line.rsplit(":", 1)[1])
            rss_start = rss_mb(proc.pid)

            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(0.2)
            answers: list[bytes] = []
            done = threading.Event()

            def receive() -> None:
                while not done.is_set():
                    try:
                        answers.append(sock.recv(70_000))
                    except TimeoutError:
                        continue

            def send() -> None:
                for i, d in enumerate(datagrams):
                    sock.sendto(d, ("127.0.0.1", port))
                    if i % 20 == 19:
                        time.sleep(0.01)  # ~2,000 datagrams/s: within the kernel's queues

            reader = threading.Thread(target=receive)
            reader.start()
            t0 = time.monotonic()
            await asyncio.to_thread(send)
            await asyncio.sleep(2)  # the last answers
            done.set()
            reader.join()
            print(f"{len(datagrams)} datagrams in {time.monotonic() - t0:.1f} s, {len(answers)} answers")

            # what the test sent, by (message id, token): the payloads a 2.04 may stand for
            # (a NON answer has a message id of its own: matched by token only)
            # (a NON answer has a message id of its own: matched by token only). A mutation may
            # have made a datagram the last block of a Block1 upload (Block1 num > 0) whose other
            # blocks were other datagrams: then the body delivered must end with its payload.
            sent: dict[tuple[int | None, bytes], set[str]] = {}
            for d in datagrams:
                m = decode(d)
                if m is not None and m.code == Code.POST:
                    b1 = m.opt.block1
                    sha = ("tail:" + m.payload.hex()) if b1 is not None and b1.block_number > 0 \
                        else hashlib.sha256(m.payload).hexdigest()
                    sent.setdefault((m.mid, m.token), set()).add(sha)
                    sent.setdefault((None, m.token), set()).add(sha)
            acked: dict[str, set[str]] = {}
            answer_of: dict[str, aiocoap.Message] = {}
            codes: dict[str, int] = {}
            for a in answers:
                m = decode(a)
                assert m is not None, f"the router sent something that is not CoAP: {a[:40]!r}"
                codes[str(m.code)] = codes.get(str(m.code), 0) + 1
                if m.code == Code.CHANGED:
                    candidates = sent.get((m.mid if m.mtype == aiocoap.ACK else None, m.token))
                    assert candidates, f"2.04 for a message id/token never sent: {m}"
                    acked[m.payload.decode()] = candidates
                    answer_of[m.payload.decode()] = m
            print("answers by code:", dict(sorted(codes.items())))
            assert len(acked) > DATAGRAMS * 0.1  # the valid ones got through

            # every acknowledged message is delivered, with the bytes that were sent
            deadline = time.monotonic() + 60
            while True:
                got = {g.ce_id: hashlib.sha256(g.body).hexdigest() for g in sink.got("/in")}
                missing = [i for i in acked if i not in got]
                if not missing:
                    break
                assert time.monotonic() < deadline, f"{len(missing)} acknowledged messages never delivered"
                await asyncio.sleep(0.1)
            bodies = {g.ce_id: g.body for g in sink.got("/in")}

            def matches(i: str, shas: set[str]) -> bool:
                return got[i] in shas or any(c.startswith("tail:") and bodies[i].endswith(bytes.fromhex(c[5:]))
                                             for c in shas)
            wrong = [i for i, shas in acked.items() if not matches(i, shas)]
            if wrong:
                a = answer_of[wrong[0]]
                raise AssertionError(f"{len(wrong)} delivered with bytes that were not sent, e.g. {wrong[0]} "
                                     f"(answer MID {a.mid}, token {a.token.hex()}, {len(bodies[wrong[0]])} bytes)")

            # still serving: a well-formed request after all that
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ok = aiocoap.Message(mtype=aiocoap.CON, mid=65_000, token=b"alive", code=Code.POST,
                                     payload=b"still serving", uri_path=[".s", "after"], uri_query=["d=last"])
            sock.settimeout(5)
            sock.sendto(ok.encode(), ("127.0.0.1", port))
            while True:
                m = decode(sock.recv(70_000))
                if m is not None and m.token == b"alive":
                    break
            assert m.code == Code.CHANGED
            sock.close()

            rss = rss_mb(proc.pid)
            print(f"router RSS {rss_start:.0f} MB at start, {rss:.0f} MB after")
            assert rss < RSS_BOUND_MB
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    errors = sum(" ERROR " in ln or ln.startswith("ERROR") for ln in text.splitlines())
    print(f"router log: {len(text)} bytes, {tracebacks} tracebacks, {errors} ERROR lines")
    assert tracebacks <= 3 and errors <= 3, text[-3000:]
    assert len(text) < 20_000, f"log of {len(text)} bytes for {DATAGRAMS} datagrams"


def test_generator_is_seeded() -> None:
    a, b = generate(random.Random(7)), generate(random.Random(7))
    assert a == b and len(a) == DATAGRAMS
    assert struct.unpack_from("!H", valid_post(random.Random(1), 513), 2)[0] == 513
