"""``pipeline ota``: firmware artifacts, releases and what devices report.

    pipeline ota upload FILE --package main --version 1.2.3 [--store S]
    pipeline ota release --package main --version 1.2.3 [--devices a,b | --tag T] [--rollout PCT]
                         [--registry devices.yaml]       # refuse unknown devices and tags
    pipeline ota status [--device D] [--history] [--json]
    pipeline ota list                                  # artifacts and releases

``upload`` stores the file in the router's store (sha256 and size computed; up to 64 MiB).
``release`` makes that version the one devices are told to install: all devices, the devices
listed, or the devices with a registry tag (``tags:`` in the device registry), and of those a
fixed ``--rollout`` percentage (the same devices each time for a package). A ``pipeline serve``
on the same store notifies observing devices within a fraction of a second. ``status`` shows
each device's last report per package (state, reason, current and target version);
``--history`` every report of ``--device``. Exit codes: 0 done, 1 nothing to show, 2 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.device_services import ota
from pipelines.store import Store

DEFAULT_STORE = "pipeline-data/store.db"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("ota", help="firmware updates: upload, release, status",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ota_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default=DEFAULT_STORE, help="the router's store (default: %(default)s)")

    up = sub.add_parser("upload", help="store a firmware file as PACKAGE@VERSION")
    up.add_argument("file", type=Path)
    up.add_argument("--package", default="main", help="package name (default: %(default)s)")
    up.add_argument("--version", required=True)
    common(up)
    rel = sub.add_parser("release", help="make PACKAGE@VERSION the desired version for devices")
    rel.add_argument("--package", default="main", help="package name (default: %(default)s)")
    rel.add_argument("--version", required=True)
    target = rel.add_mutually_exclusive_group()
    target.add_argument("--devices", type=_device_list, metavar="A,B,...", help="only these devices")
    target.add_argument("--tag", help="only devices with this registry tag")
    rel.add_argument("--rollout", type=_percent, default=100.0, metavar="PCT",
                     help="percentage of the targeted devices (default: 100)")
    rel.add_argument("--registry", help="device registry: refuse device ids and tags it does not know")
    common(rel)
    st = sub.add_parser("status", help="each device's last reported state")
    st.add_argument("--device", help="one device")
    st.add_argument("--history", action="store_true", help="every report of --device, oldest first")
    st.add_argument("--json", action="store_true", help="one JSON object per line")
    common(st)
    ls = sub.add_parser("list", help="artifacts and releases")
    ls.add_argument("--json", action="store_true")
    common(ls)
    p.set_defaults(func=run)


def _device_list(text: str) -> list[str]:
    ids = [d.strip() for d in text.split(",") if d.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("give device ids separated by commas")
    return ids


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage above 0 and at most 100")
    return value


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def run(args: argparse.Namespace) -> int:
    if args.ota_command != "upload" and not Path(args.store).exists():
        print(f"pipeline ota: no store at {args.store} (give the router's --store)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_ACTIONS[args.ota_command](args))
    except ota.OtaError as exc:
        print(f"pipeline ota {args.ota_command}: {exc}", file=sys.stderr)
        return 2


async def _upload(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ota.OtaError(f"cannot read {args.file}: {exc.strerror}") from None
    async with Store(args.store) as store:
        art = await ota.upload_artifact(store, data, package=args.package, version=args.version)
    print(f"uploaded {art.package}@{art.version}: {art.size} bytes, sha256 {art.sha256}")
    return 0


def _check_targets(args: argparse.Namespace) -> None:
    """With ``--registry``: the devices and the tag must be ones the router knows."""
    if not args.registry:
        return
    from pipelines.devices import DeviceRegistry, DeviceRegistryError
    try:
        registry = DeviceRegistry.load(args.registry)
    except DeviceRegistryError as exc:
        raise ota.OtaError(str(exc)) from None
    known = {e.device_id: e for e in registry.entries}
    unknown = sorted(set(args.devices or []) - set(known))
    if unknown:
        raise ota.OtaError(f"{args.registry} has no device {', '.join(unknown)}")
    if args.tag and not any(args.tag in e.tags for e in known.values()):
        raise ota.OtaError(f"no device in {args.registry} has the tag {args.tag!r}")


async def _release(args: argparse.Namespace) -> int:
    _check_targets(args)
    async with Store(args.store) as store:
        rel = await ota.release(store, args.package, args.version, devices=args.devices, tag=args.tag,
                                rollout=args.rollout)
    print(f"release {rel.id}: {rel.artifact.package}@{rel.artifact.version} for {rel.target}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        if args.history:
            if not args.device:
                raise ota.OtaError("--history needs --device")
            rows = await ota.events(store, args.device)
        else:
            rows = await ota.device_status(store, args.device)
    if not rows:
        print("no device has reported yet" if not args.device else f"{args.device} has not reported")
        return 1
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'DEVICE':<20} {'PACKAGE':<12} {'STATE':<12} {'REASON':<30} {'VERSION':<10} {'TARGET':<10} WHEN")
    for r in rows:
        print(f"{r['device_id']:<20} {r['package']:<12} {r['state']:<12} {r['reason']:<30} "
              f"{r['version'] or '-':<10} {r['target'] or '-':<10} {_when(r['received_at'])}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with Store(args.store) as store:
        arts = await ota.artifacts(store)
        rels = await ota.releases(store)
    if args.json:
        for a in arts:
            print(json.dumps({"artifact": a.__dict__}))
        for rel in rels:
            print(json.dumps({"release": rel.id, "package": rel.artifact.package, "version": rel.artifact.version,
                              "target": rel.target, "created_at": rel.created_at}))
        return 0
    if not arts:
        print("no artifacts")
        return 1
    print("artifacts:")
    for a in arts:
        print(f"  {a.package}@{a.version}  {a.size} bytes  sha256 {a.sha256}")
    print("releases:" if rels else "no releases")
    for rel in rels:
        print(f"  {rel.id}: {rel.artifact.package}@{rel.artifact.version} for {rel.target} ({_when(rel.created_at)})")
    return 0


_ACTIONS = {"upload": _upload, "release": _release, "status": _status, "list": _list}
