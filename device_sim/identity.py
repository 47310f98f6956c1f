"""Deterministic camera identities and the router's device registry file that matches them.

Use::

    from device_sim.identity import fleet_identities, write_registry
    cams = fleet_identities(3, seed=42, project_id="demo")   # cam-01..cam-03, keys from the seed
    cams[0].psk_identity        # b"cam-01@demo" (DTLS PSK identity)
    write_registry(tmp / "devices.yaml", cams)

The registry is written in exactly the format the router reads::

    project_id: demo
    devices:
      - id: cam-01
        project_id: demo
        psk: "<key text>"

Keys (32 characters, URL-safe base64 of 192 bits, as long as ``pipeline devices add`` makes)
are derived from the seed with SHA-256, so the
same seed always gives the same fleet. They are simulation keys: anyone who knows the seed knows
them.
"""

from __future__ import annotations

import base64
import hashlib
import re
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


def fleet_identities(count: int, *, seed: int = 0, project_id: str = "demo") -> list[DeviceIdentity]:
    """``count`` cameras named cam-01.. with keys and scenes derived from ``seed``."""
    if not 1 <= count <= MAX_DEVICES:
        raise ValueError(f"device count must be 1..{MAX_DEVICES}, got {count}")
    width = max(2, len(str(count)))
    # A seeded rotation of the scene list: every scene is used before any repeats.
    offset = int.from_bytes(hashlib.sha256(f"scenes:{seed}".encode()).digest()[:4], "big")
    identities = []
    for number in range(1, count + 1):
        device_id = f"cam-{number:0{width}d}"
        digest = hashlib.sha256(f"device-sim:{seed}:{project_id}:{device_id}".encode()).digest()
        key = base64.urlsafe_b64encode(digest[:KEY_BYTES]).decode()
        scene = SCENE_NAMES[(offset + number - 1) % len(SCENE_NAMES)]
        identities.append(DeviceIdentity(device_id, project_id, key, scene))
    return identities


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
    path.write_text(registry_yaml(identities), encoding="utf-8")
    path.chmod(0o600)
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
