"""Look into a router's store: device state, the local stream, device logs, unmatched messages.

    pipeline state cam-01 [--project demo] [--path /result]
    pipeline stream [--device cam-01] [--path /env] [--limit 20]
    pipeline logs [--limit 20]
    pipeline unmatched [--limit 20]
    pipeline stats                       # the accounting books

All read ``--store`` (default ``pipeline-data/store.db``, what ``pipeline run`` writes) and
print JSON, so they compose with ``jq``. They work while the router runs (SQLite WAL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.store import Store

DEFAULT_STORE = "pipeline-data/store.db"


def add_parser(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=DEFAULT_STORE, help=f"store database (default: {DEFAULT_STORE})")

    p = subparsers.add_parser("state", help="a device's state document (what lightdb-state wrote)")
    p.add_argument("device")
    p.add_argument("--project", default="demo", help="project id (default: demo)")
    p.add_argument("--path", default="/", help="part of the document (default: all of it)")
    common(p)
    p.set_defaults(func=lambda a: _run(a, _state))

    p = subparsers.add_parser("stream", help="the local stream store (lightdb-stream), newest first")
    p.add_argument("--device")
    p.add_argument("--project")
    p.add_argument("--path")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    p.set_defaults(func=lambda a: _run(a, _stream))

    p = subparsers.add_parser("logs", help="device log records (logs destination), newest first")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    p.set_defaults(func=lambda a: _run(a, _logs))

    p = subparsers.add_parser("unmatched", help="messages no pipeline matched, newest first")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    p.set_defaults(func=lambda a: _run(a, _unmatched))

    p = subparsers.add_parser("stats", help="the accounting books of the store")
    common(p)
    p.set_defaults(func=lambda a: _run(a, _stats))


def _run(args: argparse.Namespace, what: Any) -> int:
    if not Path(args.store).exists():
        print(f"no store at {args.store} (start the router first, or give --store)", file=sys.stderr)
        return 2
    result = asyncio.run(_with_store(args, what))
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


async def _with_store(args: argparse.Namespace, what: Any) -> Any:
    async with Store(args.store) as store:
        return await what(store, args)


async def _state(store: Store, args: argparse.Namespace) -> Any:
    from pipelines.state_doc import get_at
    doc, _ = await store.get_state(args.project, args.device)
    return get_at(doc, args.path)


async def _stream(store: Store, args: argparse.Namespace) -> Any:
    return await store.query_stream(project_id=args.project, device_id=args.device, path=args.path,
                                    limit=args.limit)


async def _logs(store: Store, args: argparse.Namespace) -> Any:
    return await store.query_logs(args.limit)


async def _unmatched(store: Store, args: argparse.Namespace) -> Any:
    return await store.unmatched(args.limit)


async def _stats(store: Store, args: argparse.Namespace) -> Any:
    return await store.counters()
