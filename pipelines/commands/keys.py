"""``pipeline keys``: API keys for the router's HTTP face (stored hashed in the store).

    pipeline keys create --scope read|admin [--name N] [--store S]   # prints the key once
    pipeline keys list   [--store S] [--all] [--json]
    pipeline keys revoke ID [--store S]
    pipeline keys webhook-secret [--store S]   # the whsec_ secret prediction callbacks are signed with

A key is sent as ``Authorization: Bearer KEY``. ``read`` keys read (GET); ``admin`` keys also
operate (POST/PUT/DELETE, e.g. ``--http-ingest``). Once any key exists the HTTP face wants one
on every request, loopback included (``/healthz``, ``/readyz`` and ``/metrics`` stay open unless
``--protect-metrics``). A running router sees new and revoked keys within a second.
``webhook-secret`` prints the secret the router made (when not given ``--webhook-secret``)
for the predictions service to sign its callbacks with.
The store is the router's (``--store``, default ``pipeline-data/store.db``, which is also
where ``pipeline run`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from pipelines.http_auth import SCOPES, KeyStore

DEFAULT_STORE = "pipeline-data/store.db"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("keys", help="create, list and revoke API keys for the HTTP face",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="make a key and print it (once)")
    c.add_argument("--scope", choices=SCOPES, required=True)
    c.add_argument("--name", default="", help="what the key is for (shown by list)")
    lst = sub.add_parser("list", help="keys that are not revoked (never the keys themselves)")
    lst.add_argument("--all", action="store_true", help="revoked keys too")
    lst.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("id")
    w = sub.add_parser("webhook-secret", help="print the router's own prediction-callback signing secret")
    for q in (c, lst, r, w):
        q.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")
    p.set_defaults(func=run)


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") if t else ""


def run(args: argparse.Namespace) -> int:
    keys = KeyStore(args.store)
    if args.keys_command == "create":
        key_id, key = keys.create(args.scope, args.name)
        print(key)
        print(f"key {key_id} ({args.scope}{', ' + args.name if args.name else ''}) stored hashed in "
              f"{args.store}; it is shown only now. Send it as 'Authorization: Bearer KEY'.",
              file=sys.stderr)
        return 0
    if args.keys_command == "list":
        rows = keys.list(include_revoked=args.all)
        if args.json:
            print(json.dumps(rows))
            return 0
        if not rows:
            print("no keys: the HTTP face is open on loopback and refuses other addresses")
            return 0
        print(f"{'ID':8}  {'SCOPE':5}  {'CREATED':25}  {'REVOKED':25}  NAME")
        for row in rows:
            print(f"{row['id']:8}  {row['scope']:5}  {_when(row['created_at']):25}  "
                  f"{_when(row['revoked_at']):25}  {row['name']}")
        return 0
    if args.keys_command == "webhook-secret":
        print(keys.webhook_secret())
        return 0
    if keys.revoke(args.id):
        print(f"key {args.id} revoked")
        return 0
    print(f"pipeline keys: no active key with id {args.id!r}", file=sys.stderr)
    return 1
