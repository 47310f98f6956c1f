"""The device registry: which devices exist, which project they belong to, and their DTLS keys.

A registry file (YAML) looks like::

    project_id: demo              # default project for entries without one
    devices:
      - id: cam-01
        project_id: demo          # optional
        psk: "my-secret-key"      # UTF-8 text; "0x..." is hex; "$NAME" / "${NAME}" a secret reference
        tags: [lobby, beta]       # optional: OTA releases can target a tag

Usage::

    registry = DeviceRegistry.load("devices.yaml")            # secret refs resolve from os.environ
    registry = DeviceRegistry.load(path, resolver=secrets.get) # or any ``name -> str | None``
    entry = registry.by_identity("cam-01@demo")   # the DTLS PSK identity, ``<device>@<project>``
    entry.psk                                      # bytes, or None when the key is not available
    registry.lookup("demo", "cam-01")              # by project and device id

An entry without ``psk`` authenticates by certificate (DTLS with a device certificate issued by
the project CA: CN = device id, O = project id). Keys are at most ``MAX_PSK_KEY`` bytes and
identities at most ``MAX_PSK_IDENTITY`` bytes (the DTLS server's limits): longer ones are refused
when the registry is loaded, naming the device and line.

Errors name the file and line (``DeviceRegistryError``). Keys never appear in ``repr``,
logs or error messages. ``registry.refresh()`` re-reads the file if it changed on disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.file_perms import warn_if_shared
from pipelines.yaml_limits import YamlLimitError, safe_load_bounded

Resolver = Callable[[str], "str | None"]

#: The one limit on PSK identities (``<device>@<project>``, UTF-8 bytes): OpenSSL's PSK_MAX_IDENTITY_LEN.
MAX_PSK_IDENTITY = 256
#: The one limit on pre-shared keys, in bytes (RFC 4279 allows more; 64 covers what devices use).
MAX_PSK_KEY = 64

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REF_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")


class DeviceRegistryError(ValueError):
    """The registry file is unreadable or invalid; the message names file and line."""


@dataclass(frozen=True)
class DeviceEntry:
    device_id: str
    project_id: str
    psk: bytes | None = field(default=None, repr=False)
    # Where the key came from ("inline", "$NAME", or None): safe to show, the key itself is not.
    psk_source: str | None = None
    line: int | None = None
    tags: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        """The DTLS PSK identity the device presents: ``<device-id>@<project-id>``."""
        return f"{self.device_id}@{self.project_id}"


def decode_psk(text: str) -> bytes:
    """Key text to bytes: ``0x`` + hex digits is binary, anything else is UTF-8 text
    (libcoap 4.3.1's ``-k`` takes the literal text)."""
    if text.startswith(("0x", "0X")) and len(text) > 2:
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            raise ValueError("key starts with 0x but is not hex") from None
    return text.encode()


def _env_resolver(name: str) -> str | None:
    return os.environ.get(name)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of each mapping (as ``__line__``)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class DeviceRegistry:
    """Devices by PSK identity and by (project, device). Build with ``load`` or ``from_entries``."""

    def __init__(self, entries: list[DeviceEntry], default_project: str = "default",
                 path: Path | None = None, resolver: Resolver | None = None) -> None:
        self.default_project = default_project
        self.path = path
        self._resolver = resolver
        self._mtime: float | None = None
        self._failed_mtime: float | None = None  # a broken version is reported once, not every poll
        self._set_entries(entries)

    def _set_entries(self, entries: list[DeviceEntry]) -> None:
        self._by_identity = {e.identity: e for e in entries}
        self._by_device: dict[str, list[DeviceEntry]] = {}
        for e in entries:
            self._by_device.setdefault(e.device_id, []).append(e)
        self.entries = list(entries)

    @classmethod
    def from_entries(cls, entries: list[DeviceEntry], default_project: str = "default") -> DeviceRegistry:
        return cls(entries, default_project)

    @classmethod
    def load(cls, path: str | os.PathLike[str], resolver: Resolver | None = None) -> DeviceRegistry:
        path = Path(path)
        default_project, entries = _parse(path, resolver or _env_resolver)
        if any(e.psk_source == "inline" for e in entries):
            warn_if_shared(path, "device registry")  # it holds keys
        reg = cls(entries, default_project, path=path, resolver=resolver)
        reg._mtime = _mtime(path)
        return reg

    def refresh(self) -> bool:
        """Re-read the file if its modification time changed; True if it was reloaded.
        An invalid new version raises ``DeviceRegistryError`` and keeps the old entries."""
        if self.path is None:
            return False
        mtime = _mtime(self.path)
        if mtime == self._mtime or mtime == self._failed_mtime:
            return False  # unchanged, or the same broken version already reported
        try:
            default_project, entries = _parse(self.path, self._resolver or _env_resolver)
        except DeviceRegistryError:
            self._failed_mtime = mtime
            raise
        self._failed_mtime = None
        self.default_project = default_project
        self._set_entries(entries)
        self._mtime = mtime
        return True

    def by_identity(self, identity: str) -> DeviceEntry | None:
        return self._by_identity.get(identity)

    def lookup(self, project_id: str, device_id: str) -> DeviceEntry | None:
        return self._by_identity.get(f"{device_id}@{project_id}")

    def find_device(self, device_id: str) -> DeviceEntry | None:
        """The entry for a device id in the default project, else the only entry with that id."""
        entry = self.lookup(self.default_project, device_id)
        if entry is not None:
            return entry
        matches = self._by_device.get(device_id, [])
        return matches[0] if len(matches) == 1 else None

    def __len__(self) -> int:
        return len(self.entries)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message: its type for containers (never their contents, which
    may be secrets or an alias-expanded tree), a cut repr otherwise."""
    if isinstance(value, dict | list):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _cut(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse(path: Path, resolver: Resolver) -> tuple[str, list[DeviceEntry]]:
    def fail(line: int | None, what: str) -> DeviceRegistryError:
        where = f"{path}:{line}" if line else str(path)
        return DeviceRegistryError(f"{where}: {what}")

    try:
        text = path.read_text()
    except OSError as exc:
        raise DeviceRegistryError(f"{path}: cannot read device registry: {exc.strerror}") from None
    try:
        doc = safe_load_bounded(text, str(path), Loader=_LineLoader)  # a SafeLoader subclass
    except YamlLimitError as exc:
        raise DeviceRegistryError(str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise fail(line, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise fail(1, "the registry must be a mapping with 'devices:'")
    default_project = doc.get("project_id", "default")
    if not isinstance(default_project, str) or not _ID_RE.match(default_project):
        raise fail(doc.get("__line__"), f"project_id must be a plain name, got {_short(default_project)}")
    devices = doc.get("devices") or []
    if not isinstance(devices, list):
        raise fail(doc.get("__line__"), "'devices' must be a list")
    unknown = set(doc) - {"project_id", "devices", "__line__"}
    if unknown:
        raise fail(doc.get("__line__"),
                   f"unknown key(s) {_cut(sorted(map(str, unknown)))}; expected project_id, devices")

    entries: list[DeviceEntry] = []
    seen: dict[str, int | None] = {}
    for item in devices:
        if not isinstance(item, dict):
            raise fail(doc.get("__line__"), f"each device must be a mapping, got {_short(item)}")
        line = item.get("__line__")
        unknown = set(item) - {"id", "project_id", "psk", "tags", "__line__"}
        if unknown:
            raise fail(line, f"unknown key(s) {_cut(sorted(map(str, unknown)))}; expected id, project_id, psk, tags")
        device_id = item.get("id")
        if not isinstance(device_id, str) or not _ID_RE.match(device_id):
            raise fail(line, f"device id must be letters, digits, '.', '_', ':' or '-', got {_short(device_id)}")
        project_id = item.get("project_id", default_project)
        if not isinstance(project_id, str) or not _ID_RE.match(project_id):
            raise fail(line, f"device {device_id}: project_id must be a plain name, got {_short(project_id)}")
        psk, source = None, None
        raw = item.get("psk")
        if raw is not None:
            if not isinstance(raw, str) or not raw:
                raise fail(line, f"device {device_id}: psk must be a non-empty string")
            ref = _REF_RE.match(raw)
            if ref:
                name = ref.group(1) or ref.group(2)
                source = f"${name}"
                value = resolver(name)
                # An unresolvable reference leaves the device without a key: DTLS refuses it.
                text = value if value else None
            else:
                source, text = "inline", raw
            if text is not None:
                try:
                    psk = decode_psk(text)
                except ValueError as exc:
                    raise fail(line, f"device {device_id}: psk ({source}): {exc}") from None
        tags = item.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) and _ID_RE.match(t) for t in tags):
            raise fail(line, f"device {device_id}: tags must be a list of plain names, got {tags!r}")
        entry = DeviceEntry(device_id, project_id, psk, source, line, tuple(tags))
        if len(entry.identity.encode()) > MAX_PSK_IDENTITY:
            raise fail(line, f"device {device_id}: identity '<device>@<project>' is "
                             f"{len(entry.identity.encode())} bytes; DTLS allows at most {MAX_PSK_IDENTITY}")
        if psk is not None and len(psk) > MAX_PSK_KEY:
            raise fail(line, f"device {device_id}: psk ({source}) is {len(psk)} bytes; "
                             f"DTLS allows at most {MAX_PSK_KEY}")
        if entry.identity in seen:
            first = seen[entry.identity]
            raise fail(line, f"device {entry.identity} is listed twice (first on line {first})")
        seen[entry.identity] = line
        entries.append(entry)
    return default_project, entries
