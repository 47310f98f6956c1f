"""``pipeline rpc``: call a method on a device and wait for its answer.

    pipeline rpc DEVICE METHOD [PARAMS...] [--timeout 10s] [--store S] [--json]
    pipeline rpc cam-01 multiply 3 4            # {"statusCode": 0, "status": "OK", "detail": {"value": 12.0}}
    pipeline rpc --list [--device D]            # recent calls and their outcome

Each PARAM is read as JSON when it is JSON (``3``, ``true``, ``"text"``, ``[1,2]``, ``{"a":1}``)
and as a string otherwise. The call goes through the router's store: a ``pipeline serve`` on
it sends the call to the device (which observes ``/.rpc``) and the device's answer comes back
here. ``--timeout`` (``500ms``, ``10s``, ``2m``; default 10s, at most 300s) bounds the wait:
a device that is offline or too slow gets a clear error, never a hang.
Exit codes: 0 the device answered OK, 1 it answered with another status, 2 no answer or errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

from pipelines.device_services import rpc as svc
from pipelines.store import Store

DEFAULT_STORE = "pipeline-data/store.db"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("rpc", help="call a method on a device and wait for the answer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device", nargs="?")
    p.add_argument("method", nargs="?")
    p.add_argument("params", nargs="*", metavar="PARAM")
    p.add_argument("--timeout", type=duration, default=10.0, help="how long to wait (default: 10s)")
    p.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.add_argument("--list", action="store_true", help="show recent calls instead")
    p.set_defaults(func=run)


def duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 500ms, 10s or 2m")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def param(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def run(args: argparse.Namespace) -> int:
    if not Path(args.store).exists():
        print(f"pipeline rpc: no store at {args.store} (give the router's --store)", file=sys.stderr)
        return 2
    if args.list:
        return asyncio.run(_list(args))
    if not args.device or not args.method:
        print("pipeline rpc: give DEVICE and METHOD", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_call(args))
    except (svc.RpcError, svc.RpcTimeout) as exc:
        print(f"pipeline rpc: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(json.dumps({"statusCode": result.status_code, "status": result.status, "detail": result.detail}))
    return 0 if result.status_code == 0 else 1


async def _call(args: argparse.Namespace) -> svc.RpcResult:
    async with Store(args.store) as store:
        return await svc.call(store, args.device, args.method, [param(p) for p in args.params],
                              timeout=args.timeout)


async def _list(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        rows = await svc.calls(store, args.device)
    for r in rows:
        print(json.dumps(r))
    return 0 if rows else 1
