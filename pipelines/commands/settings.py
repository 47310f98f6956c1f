"""``pipeline settings``: remote settings for devices, and what they answered.

    pipeline settings set KEY VALUE [--device ID | --project P] [--type int|float|bool|string] [--store S]
    pipeline settings list [--device ID] [--json] [--store S]

``set`` stores a typed setting for every device, for one project (``--project``), or for one
device (``--device``, an override). Without ``--type`` a new key's type is guessed from VALUE
(``10`` int, ``2.5`` float, ``true`` bool, anything else string); a key keeps its type, and a
VALUE that does not parse as it is refused. A ``pipeline serve`` on the same store sends the
change to observing devices within a fraction of a second.

``list`` shows every setting, then each device's last answer (``accepted``, or the error per
key, and whether it answered the newest version). With ``--device`` it shows the settings that
device is sent. Exit codes: 0 done, 1 nothing to show, 2 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.device_services import settings as svc
from pipelines.store import Store

DEFAULT_STORE = "pipeline-data/store.db"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("settings", help="remote settings for devices",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="settings_command", metavar="ACTION", required=True)
    st = sub.add_parser("set", help="set KEY to VALUE for all devices, a project or one device")
    st.add_argument("key")
    st.add_argument("value")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--device", help="only this device (an override)")
    where.add_argument("--project", help="only this project's devices")
    st.add_argument("--type", choices=svc.TYPES, help="the value's type (default: the key's, or guessed)")
    st.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    ls = sub.add_parser("list", help="settings and what devices answered")
    ls.add_argument("--device", help="the settings this device is sent, and its answer")
    ls.add_argument("--project", help="the device's project (with --device; default: any)")
    ls.add_argument("--json", action="store_true", help="JSON output")
    ls.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.settings_command == "list" and not Path(args.store).exists():
        print(f"pipeline settings: no store at {args.store} (give the router's --store)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_set(args) if args.settings_command == "set" else _list(args))
    except svc.SettingsError as exc:
        print(f"pipeline settings {args.settings_command}: {exc}", file=sys.stderr)
        return 2


async def _set(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        row = await svc.set_setting(store, args.key, args.value, type_=args.type, project=args.project,
                                    device=args.device)
    print(f"{row['key']} = {json.dumps(row['value'])} ({row['type']}) for {row['scope']}, revision {row['rev']}")
    return 0


def _answer_text(status: dict[str, Any], current: int | None) -> str:
    if status["accepted"]:
        text = "accepted"
    else:
        text = "errors: " + "; ".join(f"{e['key']}: {e['error']}" for e in status["errors"])
    if current is not None and status["version"] != current:
        text += f" (for version {status['version']}; version {current} not answered yet)"
    return text


async def _list(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        if args.device:
            project = args.project
            answers = await svc.statuses(store, args.device)
            if project is None:
                project = answers[0]["project_id"] if answers else "default"
            doc = await svc.document_for(store, project, args.device)
            answer = answers[0] if answers else None
            if args.json:
                print(json.dumps({"device_id": args.device, "project_id": project, "document": doc,
                                  "status": answer}))
                return 0
            print(f"{args.device} ({project}) is sent version {doc['version']}:")
            for k, v in doc["settings"].items():
                print(f"  {k} = {json.dumps(v)}")
            print("answer: " + (_answer_text(answer, doc["version"]) if answer else "none yet"))
            return 0
        rows = await svc.all_settings(store)
        answers = await svc.statuses(store)
    if args.json:
        print(json.dumps({"settings": rows, "statuses": answers}))
        return 0 if rows or answers else 1
    if not rows and not answers:
        print("no settings")
        return 1
    print(f"{'KEY':<24} {'TYPE':<7} {'VALUE':<20} FOR")
    for r in rows:
        print(f"{r['key']:<24} {r['type']:<7} {json.dumps(r['value']):<20} {r['scope']}")
    if answers:
        print("device answers:")
        for a in answers:
            print(f"  {a['device_id']} ({a['project_id']}) version {a['version']}: {_answer_text(a, None)}")
    return 0
