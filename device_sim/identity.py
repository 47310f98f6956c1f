"""Deterministic camera identities and the router's device registry file that matches them.

Use::

    from device_sim.identity import fleet_identities, write_registry
    cams = fleet_identities(3, seed=42, project_id="demo")   # cam-01..cam-03, fresh random keys
    same = fleet_identities(3, seed=42, key_seed=7)          # keys from key_seed: reproducible
    again = read_registry(tmp / "devices.yaml")              # the identities a registry file holds
    cams[0].psk_identity        # b"cam-01@demo" (DTLS PSK identity)
    write_registry(tmp / "devices.yaml", cams)

The registry is written in exactly the format the router reads::

    project_id: demo
    devices:
      - id: cam-01
        project_id: demo
        psk: "<key text>"

Keys (32 characters, URL-safe base64 of 192 bits, as long as ``pipeline devices add`` makes)
are random (``secrets``) unless a ``key_seed`` is given: then they are derived from it with
SHA-256, so the same key seed always gives the same keys (for reproducible benchmarks; anyone
who knows the key seed knows them, so never for a fleet reachable by others). ``seed`` only
chooses the scenes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from device_sim.scenes import SCENE_NAMES

MAX_DEVICES = 999
# 24 random bytes -> 32 key characters (a 32-byte key, like `pipeline devices add` generates).
KEY_BYTES = 24
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DeviceIdentity:
    """Who one simulated camera is: its device id, project and pre-shared key."""

    device_id: str
    project_id: str
    psk: str = field(repr=False)  # key text; never printed
    scene: str = "coffee"

    def __post_init__(self) -> None:
        for what, value in (("device id", self.device_id), ("project id", self.project_id)):
            if not _ID_RE.match(value):
                raise ValueError(
                    f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'")
        if not self.psk:
            raise ValueError(f"device {self.device_id}: empty pre-shared key")

    @property
    def psk_identity(self) -> bytes:
        """The DTLS PSK identity, ``<device-id>@<project-id>``."""
        return f"{self.device_id}@{self.project_id}".encode()

    @property
    def psk_bytes(self) -> bytes:
        return self.psk.encode()


def fleet_identities(count: int, *, seed: int = 0, project_id: str = "demo",
                     key_seed: int | None = None) -> list[DeviceIdentity]:
    """``count`` cameras named cam-01.. with scenes from ``seed`` and fresh random keys (keys
    derived from ``key_seed`` when one is given)."""
    if not 1 <= count <= MAX_DEVICES:
        raise ValueError(f"device count must be 1..{MAX_DEVICES}, got {count}")
    width = max(2, len(str(count)))
    # A seeded rotation of the scene list: every scene is used before any repeats.
    offset = int.from_bytes(hashlib.sha256(f"scenes:{seed}".encode()).digest()[:4], "big")
    identities = []
    for number in range(1, count + 1):
        device_id = f"cam-{number:0{width}d}"
        if key_seed is None:
            raw = secrets.token_bytes(KEY_BYTES)
        else:
            raw = hashlib.sha256(f"device-sim:{key_seed}:{project_id}:{device_id}".encode()).digest()
        key = base64.urlsafe_b64encode(raw[:KEY_BYTES]).decode()
        scene = SCENE_NAMES[(offset + number - 1) % len(SCENE_NAMES)]
        identities.append(DeviceIdentity(device_id, project_id, key, scene))
    return identities


def read_registry(path: str | Path, *, seed: int = 0) -> list[DeviceIdentity]:
    """The cameras a registry file written by :func:`write_registry` holds (scenes from ``seed``)."""
    text = Path(path).read_text(encoding="utf-8")
    # what write_registry writes has no aliases: refuse them rather than expand them
    if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
        raise ValueError(f"{path}: YAML aliases are not allowed in a registry written for simulated cameras")
    document = yaml.safe_load(text)
    devices = document.get("devices") if isinstance(document, dict) else None
    if not isinstance(devices, list) or not devices:
        raise ValueError(f"{path}: no devices")
    offset = int.from_bytes(hashlib.sha256(f"scenes:{seed}".encode()).digest()[:4], "big")
    out = []
    for number, d in enumerate(devices, start=1):
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("id", "psk")):
            raise ValueError(f"{path}: device {number} needs id and psk")
        out.append(DeviceIdentity(d["id"], str(d.get("project_id") or document.get("project_id")),
                                  d["psk"], SCENE_NAMES[(offset + number - 1) % len(SCENE_NAMES)]))
    return out


def registry_yaml(identities: list[DeviceIdentity]) -> str:
    """The registry document for ``identities`` (all must share one project)."""
    if not identities:
        raise ValueError("registry needs at least one device")
    projects = {identity.project_id for identity in identities}
    if len(projects) != 1:
        raise ValueError(f"registry devices span several projects: {sorted(projects)}")
    document = {
        "project_id": identities[0].project_id,
        "devices": [
            {"id": identity.device_id, "project_id": identity.project_id, "psk": identity.psk}
            for identity in identities
        ],
    }
    return yaml.dump(document, Dumper=_QuotedKeyDumper, sort_keys=False, default_flow_style=False)


def write_registry(path: str | Path, identities: list[DeviceIdentity]) -> Path:
    """Write the registry file for ``identities`` to ``path`` (mode 0600: it holds keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = registry_yaml(identities)
    path.touch(mode=0o600)  # 0600 before the keys go in, not after
    path.chmod(0o600)
    path.write_text(text, encoding="utf-8")
    return path


class _QuotedKeyDumper(yaml.SafeDumper):
    """Indents list items under their key and double-quotes the key text."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


class _Quoted(str):
    pass


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    items = [(k, _Quoted(v) if k == "psk" else v) for k, v in data.items()]
    return dumper.represent_mapping("tag:yaml.org,2002:map", items)


_QuotedKeyDumper.add_representer(dict, _represent_dict)
_QuotedKeyDumper.add_representer(
    _Quoted, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"'))
