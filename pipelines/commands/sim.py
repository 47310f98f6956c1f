"""``pipeline sim``: run a fleet of simulated cameras against a router, over the wire only.

Examples::

    pipeline sim --devices 3 --registry devices.yaml --registry-only   # fresh keys, written
    pipeline sim --devices 3 --registry devices.yaml --port 5684       # reuses that file's keys
    pipeline sim --devices 2 --transport coap --port 5683 --frames 5   # 5 frames each, then exit
    pipeline sim --devices 50 --key-seed 7 ...                         # the same keys every run

The registry file is the router's device registry for this fleet. Keys are fresh random ones
unless ``--key-seed`` (reproducible benchmarks; anyone who knows the key seed knows the keys);
``--registry FILE`` of an existing file (without ``--registry-only``) reuses the keys in it.
``--seed`` picks scenes and frames only. With ``--frames`` the command exits 0 once every frame got its answer, 1 if the
``--duration`` ran out first. This module imports only ``device_sim``, never the router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

from device_sim import CameraConfig, CameraEvent, Fleet
from device_sim.coap_link import BLOCK_SIZES
from device_sim.identity import read_registry


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sim", help="run simulated cameras that upload frames and wait for their answers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1, help="number of cameras (cam-01..), default 1")
    parser.add_argument("--seed", type=int, default=0, help="seed for scenes and frames (not keys)")
    parser.add_argument("--key-seed", type=int, default=None,
                        help="derive keys from this seed (default: fresh random keys)")
    parser.add_argument("--project", default="demo", help="project id (PSK identity cam-NN@PROJECT)")
    parser.add_argument("--transport", choices=("coaps", "coap", "mqtt"), default="coaps")
    parser.add_argument("--host", default="127.0.0.1", help="router (or MQTT broker) host")
    parser.add_argument("--port", type=int, default=None,
                        help="router port (default 5684 coaps, 5683 coap, 1883 mqtt)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between uploads per camera")
    parser.add_argument("--jitter", type=float, default=0.2, help="interval jitter, fraction (0..1)")
    parser.add_argument("--path", default="images", help="stream path: uploads go to /.s/PATH")
    parser.add_argument("--result-path", default="result", help="observed state path /.d/PATH")
    parser.add_argument("--block-size", type=int, default=1024, choices=sorted(BLOCK_SIZES),
                        metavar="BYTES", help="Block1 size, 16..1024 (power of two), default 1024")
    parser.add_argument("--format", dest="image_format", choices=("png", "jpeg"), default="png")
    parser.add_argument("--size", default="320x240", help="frame size WxH, default 320x240")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per upload attempt")
    parser.add_argument("--frames", type=int, default=None, help="frames per camera, then exit")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after SEC (0: no limit)")
    parser.add_argument("--registry", default=None, metavar="OUT.yaml",
                        help="write the router's device registry for this fleet here")
    parser.add_argument("--registry-only", action="store_true", help="write --registry and exit")
    parser.add_argument("--quiet", action="store_true", help="only print the final summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
        config = CameraConfig(
            host=args.host, port=args.port, transport=args.transport, stream_path=args.path,
            result_path=args.result_path, interval=args.interval, jitter=args.jitter,
            block_size=args.block_size, image_format=args.image_format, width=width, height=height,
            request_timeout=args.timeout, max_frames=args.frames)
        events = None if args.quiet else _print_event
        reuse = (args.registry and not args.registry_only and args.key_seed is None
                 and Path(args.registry).exists())
        if reuse:
            identities = read_registry(args.registry, seed=args.seed)
            if len(identities) < args.devices:
                raise ValueError(f"{args.registry} holds {len(identities)} device(s), not {args.devices}")
            fleet = Fleet(identities[:args.devices], config, seed=args.seed, on_event=events)
        else:
            fleet = Fleet.create(args.devices, seed=args.seed, project_id=args.project, config=config,
                                 on_event=events, key_seed=args.key_seed)
    except ValueError as exc:
        print(f"pipeline sim: {exc}", file=sys.stderr)
        return 2
    if reuse:
        print(f"keys from {args.registry}")
    elif args.registry:
        path = fleet.write_registry(args.registry)
        print(f"registry for {args.devices} device(s) of project {args.project!r} written to {path}")
    elif args.registry_only:
        print("pipeline sim: --registry-only needs --registry OUT.yaml", file=sys.stderr)
        return 2
    if args.registry_only:
        return 0
    try:
        return asyncio.run(_run_fleet(fleet, args))
    except KeyboardInterrupt:
        return 130


async def _run_fleet(fleet: Fleet, args: argparse.Namespace) -> int:
    target = f"{args.transport}://{args.host}:{fleet.config.port or 'default'}"
    print(f"{len(fleet.cameras)} camera(s) -> {target} /.s/{args.path}, every {args.interval:g} s")
    deadline = time.monotonic() + args.duration if args.duration else None
    done = False
    await fleet.start()
    try:
        while deadline is None or time.monotonic() < deadline:
            if args.frames is not None and all(
                    c.stats.frames_answered + c.stats.frames_rejected >= args.frames for c in fleet.cameras):
                done = True
                break
            await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            await fleet.stop()
        _print_summary(fleet)
    return 0 if done or args.frames is None else 1


def _print_event(event: CameraEvent) -> None:
    if event.kind == "answered":
        print(f"{event.device_id} frame {event.frame_index} ({event.frame_id}) answered in "
              f"{event.latency:.2f} s: {event.detail}", flush=True)
    elif event.kind in ("error", "rejected", "bad_result", "unanswered"):
        print(f"{event.device_id} {event.kind}: {event.detail or event.frame_id}", flush=True)


def _print_summary(fleet: Fleet) -> None:
    header = f"{'device':<10} {'sent':>5} {'acked':>5} {'answered':>8} {'errors':>6} {'retries':>7} " \
             f"{'last latency':>12}  last answer"
    print(header)
    for camera in fleet.cameras:
        s = camera.stats
        latency = f"{s.last_latency:.2f} s" if s.last_latency is not None else "-"
        print(f"{camera.device_id:<10} {s.frames_sent:>5} {s.frames_acked:>5} {s.frames_answered:>8} "
              f"{s.errors:>6} {s.retries:>7} {latency:>12}  {s.last_answer or '-'}")
    totals = fleet.totals()
    if totals["latency_p50"] is not None:
        print(f"latency p50 {totals['latency_p50']:.2f} s, p95 {totals['latency_p95']:.2f} s "
              f"over {totals['frames_answered']} answered frame(s)")
