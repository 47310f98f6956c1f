"""``pipeline dlq``: list, show, replay and purge dead letters in a router's store.

    pipeline dlq list   [--store S] [--pipeline P] [--step S] [--device D] [--since T] [--until T]
                        [--all] [--limit N] [--json] [--pipelines PATH] [--secrets FILE]
    pipeline dlq show   [--store S] ID [--payload] [--payload-out FILE] [--json] [--pipelines PATH]
                        [--secrets FILE]
    pipeline dlq replay [--store S] [--pipelines PATH] [--secrets FILE] [--override FROM=TO]
                        [ID ...] [filters]
    pipeline dlq purge  [--store S] [ID ...] [filters] [--yes]

A dead letter keeps the exact bytes, content type, metadata, pipeline, step, attempts, last
status, an excerpt of the last answer and the error (secrets redacted). ``--since``/``--until``
take an ISO 8601 time (UTC if no zone), Unix seconds, or an age such as ``90s``, ``15m``,
``2h``, ``1d``. ``list`` shows open letters only unless ``--all``.

``list`` and ``show`` redact every secret the pipelines refer to (``--pipelines``, default
``./pipeline.yaml`` if it exists, with ``--secrets`` and the environment) from what they
print: errors, answers, metadata and payloads (``--json`` included), in every form a secret
travels in (percent-encoded, base64, Basic credentials: see ``pipelines.secrets``). ``show``
prints the payload only when asked (``--payload``; with ``--json`` as ``payload_base64``,
redacted before and after encoding). Only ``--payload-out``
writes the exact bytes. Pipelines that do not load are ignored here.

``replay`` re-runs each selected letter from the step that failed, under the same message
id: a failed delivery goes back into its destination's queue; a failed transformer runs
again from that step with the message as it was then (this needs the pipelines:
``--pipelines``, default ``./pipeline.yaml``). ``--override FROM=TO`` sends requests for the
base URL FROM to TO instead (e.g. a transformer's service, run locally). A router running on the same store delivers
the replayed messages within a second or so; otherwise the next ``pipeline serve`` does.
``purge`` deletes the selected letters; it only reports what it would delete unless ``--yes``.
Exit codes: 0 done, 1 nothing matched or some letters could not be replayed, 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.commands.send import parse_overrides
from pipelines.config import load_pipelines
from pipelines.message import is_json_type
from pipelines.router import Router, RouterSettings
from pipelines.secrets import SecretSource, redact, redact_tree
from pipelines.store import DeadLetter, Store

DEFAULT_STORE = "pipeline-data/store.db"
DEFAULT_PIPELINES = "pipeline.yaml"
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from an ISO 8601 time, Unix seconds, or an age like ``15m`` (ago)."""
    now = time.time() if now is None else now
    if m := _AGE.match(text):
        return now - float(m.group(1)) * _AGE_UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2026-01-31T12:00:00Z), Unix seconds, "
            "or an age such as 90s, 15m, 2h, 1d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _positive_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dead letter id (a whole number from 1)")
    return int(text)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("dlq", help="list, show, replay and purge dead letters",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser, filters: bool, ids: bool) -> None:
        sp.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
        if ids:
            sp.add_argument("ids", nargs="*", type=_positive_id, metavar="ID", help="dead letter ids")
        if filters:
            sp.add_argument("--pipeline", help="only this pipeline")
            sp.add_argument("--step", help="only this step")
            sp.add_argument("--device", help="only this device id")
            sp.add_argument("--since", type=parse_time, help="dead-lettered at or after this time")
            sp.add_argument("--until", type=parse_time, help="dead-lettered at or before this time")
            sp.add_argument("--limit", type=int, default=1000, help="at most this many (default: 1000)")

    def secrets_options(sp: argparse.ArgumentParser, why: str) -> None:
        sp.add_argument("--pipelines", action="append", metavar="PATH",
                        help=f"pipeline file or directory (repeatable; default: ./pipeline.yaml){why}")
        sp.add_argument("--secrets", help="secrets file (NAME: value YAML or .env lines)")

    sp = sub.add_parser("list", help="dead letters, newest last")
    common(sp, filters=True, ids=False)
    sp.add_argument("--all", action="store_true", help="include letters already replayed")
    sp.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    secrets_options(sp, ": the secrets it refers to are redacted")
    sp.set_defaults(func=run)

    sp = sub.add_parser("show", help="one dead letter in full")
    sp.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    sp.add_argument("id", type=_positive_id, metavar="ID")
    sp.add_argument("--payload", action="store_true", help="show the payload too (secrets redacted)")
    sp.add_argument("--payload-out", type=Path, metavar="FILE", help="write the exact payload bytes here")
    sp.add_argument("--json", action="store_true", help="JSON (with --payload: the payload as base64)")
    secrets_options(sp, ": the secrets it refers to are redacted")
    sp.set_defaults(func=run)

    sp = sub.add_parser("replay", help="re-run dead letters from the step that failed")
    common(sp, filters=True, ids=True)
    secrets_options(sp, "")
    sp.add_argument("--override", action="append", default=[], metavar="FROM=TO",
                    help="send requests for base URL FROM to TO instead, e.g. "
                         "https://api.example.com=http://127.0.0.1:5010")
    sp.set_defaults(func=run)

    sp = sub.add_parser("purge", help="delete dead letters")
    common(sp, filters=True, ids=True)
    sp.add_argument("--yes", action="store_true", help="really delete (otherwise only report)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.store).is_file():
        print(f"pipeline dlq: no store at {args.store} (give the router's --store)", file=sys.stderr)
        return 2
    if args.dlq_command in ("list", "show"):
        _remember_pipeline_secrets(args)
    return asyncio.run(_ACTIONS[args.dlq_command](args))


def _remember_pipeline_secrets(args: argparse.Namespace) -> None:
    """Resolve what the pipelines refer to, so ``redact`` knows those secrets. Best effort:
    this process only prints, so pipelines with problems are no reason to stop."""
    paths = args.pipelines or ([DEFAULT_PIPELINES] if Path(DEFAULT_PIPELINES).exists() else [])
    try:
        secrets = SecretSource.from_sources(args.secrets)
    except ValueError as exc:  # an unusable secrets file: still the environment's
        print(f"pipeline dlq: warning: {redact(str(exc))}; secrets from the environment only",
              file=sys.stderr)
        secrets = SecretSource.from_sources(None)
    if paths:
        # only for redaction: never in the way of reading the letters
        with contextlib.suppress(Exception):
            load_pipelines(paths, secrets)


def _redact_bytes(payload: bytes) -> bytes:
    """``payload`` with the secrets in it redacted; other bytes (even invalid UTF-8) kept."""
    text = payload.decode("utf-8", "surrogateescape")
    redacted = redact(text)
    return payload if redacted == text else redacted.encode("utf-8", "surrogateescape")


async def _select(store: Store, args: argparse.Namespace, include_replayed: bool = False) -> list[DeadLetter]:
    ids = getattr(args, "ids", None) or None
    return await store.dead_letters(pipeline=args.pipeline, step=args.step, device_id=args.device,
                                    since=args.since, until=args.until, ids=ids,
                                    include_replayed=include_replayed, limit=args.limit)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str | None, width: int) -> str:
    text = " ".join(redact(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


async def _list(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        letters = await _select(store, args, include_replayed=args.all)
    if args.json:
        for dl in letters:
            print(json.dumps(_summary(dl)))
        return 0
    if not letters:
        print("no dead letters match")
        return 0
    print(f"{'ID':>5}  {'DEAD-LETTERED (UTC)':<19}  {'PIPELINE/STEP':<24} {'STAGE':<9} {'DEVICE':<12} "
          f"{'STATUS':>6} {'TRIES':>5} {'BYTES':>7}  ERROR")
    for dl in letters:
        status = str(dl.last_status) if dl.last_status is not None else "-"
        mark = " (replayed)" if dl.replayed_at else ""
        print(f"{dl.id:>5}  {_when(dl.created_at):<19}  {_one_line(dl.pipeline + '/' + dl.step, 24):<24} "
              f"{dl.stage:<9} {_one_line(dl.message.device_id, 12):<12} {status:>6} {dl.attempts:>5} "
              f"{len(dl.message.payload):>7}  {_one_line(dl.error, 60)}{mark}")
    print(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")
    return 0


def _summary(dl: DeadLetter) -> dict[str, Any]:
    return redact_tree(dl.summary())


async def _show(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        letters = await store.dead_letters(ids=[args.id], include_replayed=True)
    if not letters:
        print(f"pipeline dlq: no dead letter {args.id}", file=sys.stderr)
        return 1
    dl = letters[0]
    payload = dl.message.payload
    if args.payload_out:
        args.payload_out.write_bytes(payload)
    shown = _redact_bytes(payload)
    if args.json:
        import base64
        extra: dict[str, Any] = {}
        if args.payload:
            encoded = redact(base64.b64encode(shown).decode())  # a secret in a base64 form inside too
            extra = {"payload_base64": encoded, **({"payload_redacted": True} if shown != payload or
                                                   encoded != base64.b64encode(shown).decode() else {})}
        print(json.dumps({**_summary(dl), **extra}, indent=2))
        return 0
    summary = _summary(dl)
    for key in ("id", "message_id", "pipeline", "step", "stage", "project_id", "device_id", "path",
                "content_type", "size", "attempts", "last_status", "error", "response_excerpt",
                "created_at", "replayed_at", "metadata"):
        value = summary[key]
        if value is None:
            continue
        print(f"{key + ':':<17} {json.dumps(value) if isinstance(value, dict) else value}")
    if not args.payload:
        print(f"payload:          {len(payload)} bytes (--payload shows it, secrets redacted; "
              "--payload-out FILE writes the exact bytes)")
        if args.payload_out:
            print(f"payload written to {args.payload_out} ({len(payload)} bytes)")
        return 0
    print("payload:")
    text = _as_text(payload, dl.message.content_type)
    if text is not None:
        text = redact(text)
        print(text[:2000] + ("…" if len(text) > 2000 else ""))
    else:
        if shown != payload:
            print("  (secrets in it shown as ***: --payload-out FILE writes the exact bytes)")
        for off in range(0, min(len(shown), 256), 16):
            chunk = shown[off:off + 16]
            printable = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
            print(f"  {off:08x}  {chunk.hex(' '):<47}  {printable}")
        if len(shown) > 256:
            print(f"  … {len(shown) - 256} more bytes (--payload-out FILE writes them all)")
    if args.payload_out:
        print(f"payload written to {args.payload_out} ({len(payload)} bytes)")
    return 0


def _as_text(payload: bytes, content_type: str) -> str | None:
    if not (is_json_type(content_type) or content_type.startswith("text/")):
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


async def _replay(args: argparse.Namespace) -> int:
    if not (args.ids or args.pipeline or args.step or args.device or args.since or args.until):
        print("pipeline dlq replay: say which letters: IDs, or --pipeline/--step/--device/--since/--until",
              file=sys.stderr)
        return 2
    pipelines = args.pipelines or ["pipeline.yaml"]
    router = Router(RouterSettings(pipelines=pipelines, store_path=args.store, secrets_file=args.secrets,
                                   url_overrides=parse_overrides(args.override)))
    await router.open_for_replay()
    try:
        letters = await _select(router.store, args)
        if not letters:
            print("no open dead letters match")
            return 1
        failed = 0
        for dl in letters:
            try:
                ok = await router.replay_dead_letter(dl.id)
            except LookupError as exc:
                ok, why = False, str(exc)
            else:
                why = "already replayed"
            if ok:
                print(f"{dl.id}: replayed {dl.pipeline}/{dl.step} ({dl.stage}) message {dl.message_id}")
            else:
                failed += 1
                print(f"{dl.id}: not replayed: {redact(why)}")
        done = len(letters) - failed
        print(f"{done} of {len(letters)} replayed; their deliveries are queued for the router")
        return 1 if failed else 0
    finally:
        await router.stop()


async def _purge(args: argparse.Namespace) -> int:
    if not (args.ids or args.pipeline or args.step or args.device or args.since or args.until):
        print("pipeline dlq purge: say which letters: IDs, or --pipeline/--step/--device/--since/--until",
              file=sys.stderr)
        return 2
    async with Store(args.store) as store:
        letters = await _select(store, args, include_replayed=True)
        if not letters:
            print("no dead letters match")
            return 1
        if not args.yes:
            print(f"would purge {len(letters)} dead letter{'s' if len(letters) != 1 else ''} "
                  f"(ids {', '.join(str(d.id) for d in letters[:20])}{' …' if len(letters) > 20 else ''}); "
                  "add --yes to delete them")
            return 1
        n = await store.purge_dead_letters([d.id for d in letters])
    print(f"purged {n} dead letter{'s' if n != 1 else ''}")
    return 0


_ACTIONS = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}
