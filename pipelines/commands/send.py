"""``pipeline send``: push a file (or stdin) through the pipelines and show every step.

    pipeline send --device cam-1 --path /images --content-type image/png frame.png
    echo '{"temp": 21.5}' | pipeline send --device dev-1 --path /env -

The message goes through the router exactly as a device's would (inbox, engine, delivery
queues, retries), against a store of its own unless ``--store`` is given. It prints what
each step produced and what each destination answered, then exits: 0 when every
delivery succeeded, 1 when something failed (dead letter) or is still retrying at
``--wait``, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.message import Message
from pipelines.router import ConfigError, Router, RouterSettings
from pipelines.secrets import redact


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("send", help="push a file through the pipelines as a device, showing each step",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="payload file, or - for stdin")
    p.add_argument("--device", default="local-device", help="device id (default: local-device)")
    p.add_argument("--project", default="default", help="project id (default: default)")
    p.add_argument("--path", required=True, help="stream path, e.g. /images")
    p.add_argument("--content-type", default="application/octet-stream",
                   help="MIME type of the payload (default: application/octet-stream)")
    p.add_argument("--pipelines", action="append", default=None, metavar="PATH",
                   help="pipeline file or directory (repeatable; default: ./pipeline.yaml)")
    p.add_argument("--secrets", help="secrets file (NAME: value YAML or .env lines)")
    p.add_argument("--store", help="store database (default: a temporary one)")
    p.add_argument("--override", action="append", default=[], metavar="FROM=TO",
                   help="send requests for base URL FROM to TO instead, e.g. "
                        "https://api.replicate.com=http://127.0.0.1:5010")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for deliveries, retries included (default: 30)")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--override wants FROM=TO, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().rstrip("/")] = v.strip().rstrip("/")
    return out


def run(args: argparse.Namespace) -> int:
    payload = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    return asyncio.run(_send(args, payload))


async def _send(args: argparse.Namespace, payload: bytes) -> int:
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    with tempfile.TemporaryDirectory(prefix="pipeline-send-") as tmp:
        settings = RouterSettings(
            pipelines=args.pipelines or ["pipeline.yaml"],
            store_path=args.store or Path(tmp) / "send.db",
            secrets_file=args.secrets,
            url_overrides=parse_overrides(args.override),
        )
        router = Router(settings)
        try:
            await router.start()
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        answers: list[tuple[str, int, str]] = []

        async def record(message: Message, url: str, response: httpx.Response) -> None:
            answers.append((url, response.status_code, response.text[:300]))
        router.add_http_hooks(response=record)
        try:
            message = Message.new(device_id=args.device, project_id=args.project, path=args.path,
                                  content_type=args.content_type, payload=payload)
            outcome, trace = await router.send(message)
            console.print(f"message [bold]{message.id}[/] from {escape(args.device)} on "
                          f"{escape(args.path)} ({escape(args.content_type)}, {len(payload)} bytes)")
            if not outcome.matched:
                console.print("[yellow]no pipeline matched[/]: recorded as unmatched "
                              "(check the filters' path and content_type)")
                return 1
            table = Table("pipeline", "step", "did", "content type", "bytes", "detail")
            for t in trace:
                detail = t.error or (_preview(t.preview) if t.preview else "")
                colour = {"failed": "red", "enqueued": "cyan"}.get(t.action, "green")
                table.add_row(t.pipeline, t.step, f"[{colour}]{t.action}[/]", t.content_type or "",
                              "" if t.size is None else str(t.size), escape(redact(detail)))
            console.print(table)
            ok = await _wait_for_deliveries(router, message, outcome, args.wait, console)
            for url, status, body in answers:
                console.print(f"  answer from {escape(redact(url))}: HTTP {status} {escape(redact(body))}")
            return 0 if ok and not outcome.dead else 1
        finally:
            await router.stop()


async def _wait_for_deliveries(router: Router, message: Message, outcome: Any, wait: float,
                               console: Console) -> bool:
    pending = {(d.pipeline, d.step) for d in outcome.deliveries}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        depths = await router.store.queue_depths()
        if not any(depths.get(k) for k in pending):
            break
        await asyncio.sleep(0.05)
    dead = await router.store.dead_letters(include_replayed=False)
    ok = True
    for d in outcome.deliveries:
        mine = [x for x in dead if x.message_id == message.id and x.pipeline == d.pipeline and x.step == d.step]
        depths = await router.store.queue_depths()
        if mine:
            ok = False
            console.print(f"[red]✗[/] {d.pipeline}/{d.step}: dead letter #{mine[0].id}: "
                          f"{escape(redact(mine[0].error))}")
        elif depths.get((d.pipeline, d.step)):
            ok = False
            console.print(f"[yellow]…[/] {d.pipeline}/{d.step}: still retrying after {wait:g} s")
        else:
            console.print(f"[green]✓[/] {d.pipeline}/{d.step}: delivered")
    return ok


def _preview(data: bytes) -> str:
    text = data[:120].decode("utf-8", "replace")
    printable = "".join(ch if ch.isprintable() else "·" for ch in text)
    return printable + ("…" if len(data) > 120 else "")
