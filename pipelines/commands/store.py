"""``pipeline store``: back up the router's store while it runs, and check a backup.

    pipeline store backup backups/store.db [--store pipeline-data/store.db]
    pipeline store check backups/store.db

``backup`` takes a consistent copy with SQLite's online backup API: the router keeps running
and writing; the copy is the store as one committed moment left it. ``check`` runs SQLite's
integrity check and the router's books on a file (a backup, or a stopped router's store) and
exits 1 if either fails. To restore: stop the router, ``pipeline store check`` the backup, copy
it over the store file (and delete the store's ``-wal`` and ``-shm`` files), start the router:
it resumes whatever the backup held unfinished (see README, "Backups").
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.backup import backup_store, check_store

DEFAULT_STORE = "pipeline-data/store.db"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("store", help="back up the router's store, check a backup",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    b = sub.add_parser("backup", help="a consistent copy of the store, while the router runs")
    b.add_argument("file", help="where the backup goes (replaced if it exists)")
    b.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    b.set_defaults(func=_backup)
    c = sub.add_parser("check", help="integrity check and books of a store file or backup")
    c.add_argument("file", help="the store file or backup to check")
    c.add_argument("--json", action="store_true", help="the report as JSON")
    c.set_defaults(func=_check)


def _backup(args: argparse.Namespace) -> int:
    info = backup_store(args.store, args.file)
    print(f"backed up {args.store} to {info.path} ({info.bytes} bytes, {info.seconds:.2f} s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    report = check_store(args.file)
    if args.json:
        print(json.dumps({"file": str(report.path), "ok": report.ok, "problems": report.problems,
                          "books": report.books}, indent=2))
        return 0 if report.ok else 1
    for problem in report.problems:
        print(f"{report.path}: {problem}")
    if report.ok:
        b = report.books
        print(f"{report.path}: ok (integrity check passed, books balance): {b.get('ingested', 0)} ingested ="
              f" {b.get('routed', 0)} routed + {b.get('unmatched', 0)} unmatched + {b.get('inbox', 0)} waiting;"
              f" {b.get('deliveries_queued', 0)} deliveries queued, {b.get('dead_letters_open', 0)} dead letters open")
    return 0 if report.ok else 1
