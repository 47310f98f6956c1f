"""``pipeline devices``: look at and add to the device registry (who may connect over CoAP/DTLS).

    pipeline devices list --registry devices.yaml
    pipeline devices add cam-07 --registry devices.yaml                # generates a key, prints it once
    pipeline devices add cam-08 --project demo --psk-ref CAM08_PSK     # key kept in a secret store
    pipeline devices add cam-09 --psk "my key text"
    pipeline devices add-cert cam-10 --project demo --ca-dir pki --out pki/devices --registry devices.yaml

``list`` validates the file (errors name FILE:LINE) and shows each device's PSK identity
(``<device>@<project>``) and where its key comes from, never the key. ``add`` rewrites the file
(mode 0600; comments are not kept) and refuses a device that is already there. ``add-cert``
issues the device's key and certificate from the project CA (``pipeline certs init-ca``;
CN = device id, O = project id) and, with ``--registry``, adds the device without a key
(it authenticates by certificate) unless it is there already.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.devices import DeviceEntry, DeviceRegistry, DeviceRegistryError
from pipelines.yaml_limits import safe_load_bounded

_NO_KEY = "missing (DTLS refused)"


class _Quoted(str):
    """Keys are always written quoted, so YAML never reads one back as a number."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Quoted, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", str(v), style='"'))


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("devices", help="list or add devices in the device registry",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="devices_command", metavar="ACTION")
    ls = sub.add_parser("list", help="validate the registry and list its devices (never the keys)")
    ls.add_argument("--registry", default="devices.yaml", help="registry file (default: devices.yaml)")
    ls.set_defaults(func=run)
    add = sub.add_parser("add", help="add a device (generates a key unless one is given)")
    add.add_argument("device_id")
    add.add_argument("--registry", default="devices.yaml", help="registry file (default: devices.yaml)")
    add.add_argument("--project", help="project id (default: the registry's project_id)")
    key = add.add_mutually_exclusive_group()
    key.add_argument("--psk", help="the key text (0x... for hex); default: a new random key")
    key.add_argument("--psk-ref", metavar="NAME", help="store the key as the secret reference $NAME")
    add.set_defaults(func=run)
    cert = sub.add_parser("add-cert", help="issue a device key and certificate from the project CA")
    cert.add_argument("device_id")
    cert.add_argument("--project", required=True, help="project id (the certificate's O)")
    cert.add_argument("--ca-dir", required=True, help="directory with ca.pem and ca.key (pipeline certs init-ca)")
    cert.add_argument("--out", required=True, help="directory for <device>.pem and <device>.key")
    cert.add_argument("--registry", help="also add the device (without a key) to this registry file")
    cert.set_defaults(func=run)
    p.set_defaults(func=run)


def _source(entry: DeviceEntry) -> str:
    if entry.psk is None and entry.psk_source is None:
        return "none (certificate)"
    if entry.psk is None:
        return f"{entry.psk_source} {_NO_KEY}" if entry.psk_source else _NO_KEY
    return entry.psk_source or "inline"


def _list(path: Path) -> int:
    reg = DeviceRegistry.load(path)
    print(f"{path}: {len(reg)} device(s), default project {reg.default_project}")
    width = max([len(e.identity) for e in reg.entries] + [8])
    for e in reg.entries:
        print(f"  {e.identity:<{width}}  key: {_source(e)}")
    return 0


def _add_cert(args: argparse.Namespace) -> int:
    from pipelines.certs import CertError, issue_device_cert

    try:
        files = issue_device_cert(args.device_id, args.project, Path(args.ca_dir), Path(args.out))
    except CertError as exc:
        print(f"pipeline devices add-cert: {exc}", file=sys.stderr)
        return 1
    print(f"certificate for {args.device_id}@{args.project}: {files.cert} (key {files.key})")
    if args.registry:
        path = Path(args.registry)
        if path.exists() and DeviceRegistry.load(path).lookup(args.project, args.device_id) is not None:
            print(f"{args.device_id}@{args.project} is in {path} already")
            return 0
        return _add(path, args.device_id, args.project, None, None, certificate=True)
    return 0


def _add(path: Path, device_id: str, project: str | None, psk: str | None, psk_ref: str | None,
         certificate: bool = False) -> int:
    if path.exists():
        DeviceRegistry.load(path)  # validate before touching it
        doc = safe_load_bounded(path.read_text(), str(path)) or {}
    else:
        doc = {"project_id": project or "default", "devices": []}
    doc.setdefault("devices", [])
    default_project = doc.get("project_id", "default")
    generated = None
    key_value: str | None = None   # a certificate device has no key
    if psk_ref:
        key_value = f"${psk_ref}"
    elif psk:
        key_value = psk
    elif not certificate:
        generated = key_value = secrets.token_hex(16)  # 32 characters: a 32-byte key
    item: dict[str, Any] = {"id": device_id}
    if project and project != default_project:
        item["project_id"] = project
    if key_value is not None:
        item["psk"] = _Quoted(key_value)
    doc["devices"].append(item)
    for other in doc["devices"]:
        if isinstance(other, dict) and isinstance(other.get("psk"), str):
            other["psk"] = _Quoted(other["psk"])
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        DeviceRegistry.load(tmp)  # the new file must load (duplicates, bad ids) before it replaces the old
    except DeviceRegistryError as exc:
        tmp.unlink()
        raise DeviceRegistryError(str(exc).replace(str(tmp), str(path))) from None
    tmp.replace(path)
    identity = f"{device_id}@{project or default_project}"
    print(f"added {identity} to {path}")
    if generated:
        print(f"key (shown once; give it to the device): {generated}")
    return 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "devices_command", None)
    if action is None:
        print("pipeline devices: choose an action: list, add or add-cert", file=sys.stderr)
        return 2
    try:
        if action == "list":
            return _list(Path(args.registry))
        if action == "add-cert":
            return _add_cert(args)
        return _add(Path(args.registry), args.device_id, args.project, args.psk, args.psk_ref)
    except DeviceRegistryError as exc:
        print(f"pipeline devices {action}: {exc}", file=sys.stderr)
        return 1
