"""Messages/s from MQTT publishers through mosquitto into the router's store.

    python bench/mqtt_ingest.py [--messages 30000] [--size 256] [--publishers 3]

Runs, in one go and against one fresh mosquitto per case (real processes throughout):

* ``bare``: a bare aiomqtt subscriber (QoS 1, acks on receipt, does nothing) — the baseline;
* ``1 worker``: ``pipeline mqtt-worker`` (router + store + engine; QoS 1 acked after the
  store commit) with a pipeline that matches nothing, so every message is stored in the
  inbox and then recorded as unmatched;
* ``2 workers``: two such workers in one shared-subscription group, each with its own store.

Drain mode, so that publishers and consumers do not fight over the same CPUs: each consumer
first subscribes with a persistent session (MQTT v5 session expiry) and goes away; the
publishers (separate processes, paho, QoS 1, up to 1000 in flight each) then publish the
whole backlog, which mosquitto queues for the absent sessions (round-robin between the
members of the shared group); then the consumers start again and drain it. The rate is
messages / (time of the last stored message - time of the first), measured at the consumer
(for the workers: their store counters, polled every 20 ms; for the bare subscriber: from its
CONNACK, since the backlog starts flowing then).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mqtt_broker import Mosquitto  # noqa: E402

TOPIC = "bench/dev-{}/stream/data"
PIPELINE = """
pipelines:
  nothing-matches:
    filter: {path: "/never"}
    steps:
      - name: log
        destination: {type: logs, version: v1}
"""


def publisher(port: int, index: int, count: int, size: int, out: mp.Queue) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    payload = os.urandom(size)
    topic = TOPIC.format(index)
    t0 = time.time()
    infos = [c.publish(topic, payload, qos=1) for _ in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    out.put((t0, time.time()))
    c.loop_stop()
    c.disconnect()


def bare_subscriber(port: int, total: int, ready: mp.Event, out: mp.Queue, subscribe_only: bool) -> None:
    import asyncio

    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare", clean_start=False,
                                  properties=props, protocol=aiomqtt.ProtocolVersion.V5) as client:
            # the backlog flows from CONNACK on: count from here, not from the first message
            # taken from aiomqtt's queue (by then many are already read)
            first = time.time()
            await client.subscribe("+/+/stream/#", qos=1)
            ready.set()
            if subscribe_only:
                return
            n = 0
            async for _ in client.messages:
                n += 1
                if n >= total:
                    break
            out.put((first, time.time()))

    asyncio.run(main())


def store_count(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT value FROM counters WHERE name='ingested'").fetchone()[0]
    except sqlite3.Error:
        return 0


def run_publishers(port: int, total: int, size: int, publishers: int) -> tuple[list[mp.Process], mp.Queue]:
    out: mp.Queue = mp.Queue()
    per = total // publishers
    procs = [mp.Process(target=publisher, args=(port, i, per, size, out)) for i in range(publishers)]
    for p in procs:
        p.start()
    return procs, out


def offered(out: mp.Queue, publishers: int, total: int) -> float:
    spans = [out.get(timeout=120) for _ in range(publishers)]
    return total / (max(e for _, e in spans) - min(s for s, _ in spans))


def case_bare(work: Path, total: int, size: int, publishers: int) -> tuple[float, float]:
    with Mosquitto(work / "broker-bare") as broker:
        ready, out = mp.Event(), mp.Queue()
        sub = mp.Process(target=bare_subscriber, args=(broker.port, total, ready, out, True))
        sub.start()
        sub.join(30)
        procs, pub_out = run_publishers(broker.port, total, size, publishers)
        rate_offered = offered(pub_out, publishers, total)
        for p in procs:
            p.join(30)
        sub = mp.Process(target=bare_subscriber, args=(broker.port, total, ready, out, False))
        sub.start()
        first, last = out.get(timeout=300)
        sub.join(30)
        return total / (last - first), rate_offered


def case_workers(work: Path, n_workers: int, total: int, size: int,
                 publishers: int) -> tuple[float, float, int]:
    pipes = work / "pipeline.yaml"
    pipes.write_text(PIPELINE)
    with Mosquitto(work / f"broker-{n_workers}") as broker:
        stores = [work / f"w{n_workers}-{i}.db" for i in range(n_workers)]
        logs = [work / f"w{n_workers}-{i}.log" for i in range(n_workers)]

        def start_workers() -> list[subprocess.Popen]:
            return [subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", "mqtt-worker", "--broker",
                 f"mqtt://127.0.0.1:{broker.port}", "--pipelines", str(pipes), "--store", str(store),
                 "--group", "bench", "--client-id", f"bench-w{i}", "--log-level", "INFO"],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
                for i, (store, log) in enumerate(zip(stores, logs, strict=True))]

        # 1. create the sessions, then leave (SIGTERM: the sessions stay at the broker)
        workers = start_workers()
        deadline = time.time() + 60
        while not all(p.exists() and "subscribed to" in p.read_text(errors="replace") for p in logs):
            if time.time() > deadline:
                raise RuntimeError("workers did not subscribe")
            time.sleep(0.05)
        for w in workers:
            w.terminate()
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        # 2. the backlog
        procs, pub_out = run_publishers(broker.port, total, size, publishers)
        rate_offered = offered(pub_out, publishers, total)
        for p in procs:
            p.join(30)
        # 3. drain it
        workers = start_workers()
        try:
            first = last = 0.0
            deadline = time.time() + 300
            while time.time() < deadline:
                n = sum(store_count(s) for s in stores)
                now = time.time()
                if n and not first:
                    first = now
                if n >= total:
                    last = now
                    break
                time.sleep(0.02)
            if not last:
                raise RuntimeError(f"only {n} of {total} messages were stored")
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
        # a worker whose engine falls behind its ingest pushes back at max_inbox (the ingest
        # retries within 0.25 s): say so, it explains a slower run
        pushbacks = sum(log.read_text(errors="replace").count("pushing back on ingest") for log in logs)
        return total / (last - first), rate_offered, pushbacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=30000)
    ap.add_argument("--size", type=int, default=256, help="payload bytes")
    ap.add_argument("--publishers", type=int, default=3)
    args = ap.parse_args()
    total = args.messages - args.messages % args.publishers
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bare, bare_off = case_bare(work, total, args.size, args.publishers)
        one, one_off, one_pushed = case_workers(work, 1, total, args.size, args.publishers)
        two, two_off, two_pushed = case_workers(work, 2, total, args.size, args.publishers)
    print(f"\nMQTT ingest, {total} messages of {args.size} B, QoS 1, {args.publishers} publisher processes,"
          f" mosquitto on loopback, {os.cpu_count()} CPUs\n")
    print(f"{'consumer':<34}{'msg/s':>10}{'publish msg/s':>16}{'ratio':>18}")
    print(f"{'bare aiomqtt subscriber':<34}{bare:>10.0f}{bare_off:>16.0f}{'1.00x bare':>18}")
    print(f"{'router, 1 worker (ack after store)':<34}{one:>10.0f}{one_off:>16.0f}{one / bare:>13.2f}x bare")
    print(f"{'router, 2 workers ($share group)':<34}{two:>10.0f}{two_off:>16.0f}{two / one:>14.2f}x one")
    print("\ntargets: 1 worker >= 0.8x bare; 2 workers >= 1.3x one")
    if one_pushed or two_pushed:
        print(f"router pushed back on ingest (inbox at max_inbox): {one_pushed} time(s) with 1 worker,"
              f" {two_pushed} with 2")


if __name__ == "__main__":
    main()
