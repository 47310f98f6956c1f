"""The message: bytes plus who sent them, where, what they are and when.

Usage::

    msg = Message.new(device_id="cam-1", project_id="demo", path="/images",
                      content_type="image/png", payload=png_bytes)
    doc = msg.json()                       # parsed once, cached on the message
    out = msg.evolve(json={"image": ...})  # a JSON step: no re-serialising in between
    out.payload                            # bytes, serialised lazily the first time asked

Payloads stay bytes end to end. A step that produces JSON may hand over the parsed
value instead (``evolve(json=...)``); the next JSON step reads it without parsing, so a
run of consecutive JSON steps parses once and serialises once.
"""

from __future__ import annotations

import json as _json
import uuid
from datetime import UTC, datetime
from typing import Any

from pipelines.json_limits import JSONTooDeep, loads_bounded

JSON_TYPE = "application/json"

_UNSET: Any = object()


class NotJSONError(ValueError):
    """The payload was asked for as JSON but is not valid JSON."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_json_type(content_type: str) -> bool:
    """True for ``application/json`` and ``application/*+json`` (parameters ignored)."""
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON_TYPE or (base.startswith("application/") and base.endswith("+json"))


# one encoder for the process: json.dumps() with non-default separators builds a new one per call
_ENCODER = _json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_encode_str = _json.encoder.encode_basestring  # the C escaper for one string


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the one serialisation used everywhere."""
    return _ENCODER.encode(value).encode()


_UNSAFE_CHARS = frozenset('"\\') | frozenset(chr(c) for c in range(0x20)) | {chr(0x7F)}


def is_json_safe(text: str) -> bool:
    """True if ``text`` can stand between JSON quotes as it is (for short strings)."""
    return text.isascii() and not any(ch in _UNSAFE_CHARS for ch in text)


_KEY_PARTS: dict[str, bytes] = {}  # object key -> its JSON text with quotes and the colon


def _key_part(k: Any) -> bytes:
    part = _KEY_PARTS.get(k) if type(k) is str else None
    if part is None:
        part = _encode_str(k if type(k) is str else dumps(k).decode().strip('"')).encode() + b":"
        if type(k) is str and len(_KEY_PARTS) < 4096 and len(k) <= 64:  # bounded: keys repeat
            _KEY_PARTS[k] = part
    return part


def _dumps_parts(value: Any, out: list[bytes], safe: dict[int, bytes | None]) -> None:
    t = type(value)
    if t is str:
        if id(value) in safe:
            encoded = safe[id(value)]
            out += (b'"', value.encode("ascii") if encoded is None else encoded, b'"')
        else:
            out.append(_encode_str(value).encode())
    elif t is dict:
        sep = b"{"
        for k, v in value.items():
            out.append(sep)
            out.append(_key_part(k))
            _dumps_parts(v, out, safe)
            sep = b","
        out.append(b"}" if sep == b"," else b"{}")
    elif t is list:
        sep = b"["
        for v in value:
            out.append(sep)
            _dumps_parts(v, out, safe)
            sep = b","
        out.append(b"]" if sep == b"," else b"[]")
    else:
        out.append(dumps(value))


def dumps_with_safe_strings(value: Any, safe_strings: tuple[str, ...],
                            encoded: tuple[bytes, ...] = ()) -> bytes:
    """Like ``dumps`` (the same bytes), but the strings in ``safe_strings`` (the very objects,
    known to need no escaping) are copied rather than escaped. For a JSON body carrying a
    200 KB data URL the escaping encoder is most of the cost of building the request.
    ``encoded``, when given, holds each safe string's bytes (its ASCII encoding, which the
    producer already had): they are used as they are, saving one more copy of the string."""
    out: list[bytes] = []
    if encoded:
        safe: dict[int, bytes | None] = {id(x): b for x, b in zip(safe_strings, encoded, strict=True)}
    else:
        safe = dict.fromkeys(map(id, safe_strings))
    _dumps_parts(value, out, safe)
    return b"".join(out)


_new_message = object.__new__


class Message:
    """One unit of data moving through the router. Immutable by convention: use ``evolve``."""

    __slots__ = ("_json", "_json_safe_text", "_payload", "_safe_encoded", "_safe_strings", "content_type",
                 "device_id", "id", "metadata",
                 "path", "project_id", "timestamp")

    def __init__(
        self,
        *,
        id: str,
        project_id: str,
        device_id: str,
        path: str,
        content_type: str,
        timestamp: datetime,
        payload: bytes | None = None,
        json: Any = _UNSET,
        metadata: dict[str, Any] | None = None,
        safe_strings: tuple[str, ...] = (),
        safe_encoded: tuple[bytes, ...] = (),
        json_safe_text: bool = False,
    ) -> None:
        if payload is None and json is _UNSET:
            raise ValueError("a message needs a payload or a JSON value")
        self.id = id
        self.project_id = project_id
        self.device_id = device_id
        self.path = path
        self.content_type = content_type
        self.timestamp = timestamp
        self.metadata: dict[str, Any] = metadata if metadata is not None else {}
        self._payload = payload
        self._json = json
        # strings in the JSON value known to need no escaping; held here so that their ids
        # stay unique for as long as this message lives
        self._safe_strings = safe_strings
        # empty, or each safe string's ASCII bytes (dumps_with_safe_strings' ``encoded``)
        self._safe_encoded = safe_encoded
        # the payload is printable ASCII text with no '"' or '\\' (a data URL, base64)
        self._json_safe_text = json_safe_text

    @property
    def json_safe_text(self) -> bool:
        """The producer vouched that the payload can stand in a JSON string unescaped."""
        return self._json_safe_text

    @classmethod
    def new(
        cls,
        *,
        device_id: str,
        path: str,
        content_type: str,
        payload: bytes,
        project_id: str = "default",
        timestamp: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        id: str | None = None,
    ) -> Message:
        return cls(
            id=id or str(uuid.uuid4()),
            project_id=project_id,
            device_id=device_id,
            path=path,
            content_type=content_type,
            timestamp=timestamp or utcnow(),
            payload=bytes(payload),
            metadata=metadata,
        )

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = (dumps_with_safe_strings(self._json, self._safe_strings, self._safe_encoded)
                             if self._safe_strings else dumps(self._json))
        return self._payload

    def json(self) -> Any:
        """The payload parsed as JSON (cached). Raises ``NotJSONError`` with a short reason."""
        if self._json is _UNSET:
            try:
                self._json = loads_bounded(self._payload)  # type: ignore[arg-type]
            except JSONTooDeep as exc:
                raise NotJSONError(f"payload is not usable JSON: {exc}") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise NotJSONError(f"payload is not valid JSON: {exc}") from None
            except RecursionError:  # a device's "[[[[..." must not pass for an internal error
                raise NotJSONError("payload is not usable JSON: nested too deeply") from None
        return self._json

    def evolve(
        self,
        *,
        payload: bytes | None = None,
        json: Any = _UNSET,
        content_type: str | None = None,
        timestamp: datetime | None = None,
        path: str | None = None,
        metadata: dict[str, Any] | None = None,
        safe_strings: tuple[str, ...] | None = None,
        safe_encoded: tuple[bytes, ...] | None = None,
        json_safe_text: bool = False,
    ) -> Message:
        """A copy with some fields changed. Give ``payload`` or ``json`` to change the body;
        ``json`` implies ``application/json`` unless ``content_type`` says otherwise.
        ``safe_strings``: string objects in the new JSON value that need no escaping (see
        ``dumps_with_safe_strings``); by default a JSON value derived from this message's
        keeps this message's, which is harmless where they are no longer part of it.
        ``safe_encoded``: with ``safe_strings``, each one's ASCII bytes (reused when serialising).
        ``json_safe_text``: the new payload is printable ASCII with no ``"`` or ``\\``."""
        if payload is not None and json is not _UNSET:
            raise ValueError("give payload or json, not both")
        if payload is None and json is _UNSET:
            new_payload, new_json = self._payload, self._json
            json_safe_text = json_safe_text or self._json_safe_text
        else:
            new_payload, new_json = payload, json
        if json is not _UNSET and content_type is None:
            content_type = JSON_TYPE
        if safe_strings is None:
            safe_strings = self._safe_strings if payload is None else ()
            if safe_encoded is None:
                safe_encoded = self._safe_encoded if payload is None else ()
        elif safe_encoded is None:
            safe_encoded = ()
        # the fields set directly (no keyword call into __init__): evolve runs once per step
        out = _new_message(Message)
        out.id = self.id
        out.project_id = self.project_id
        out.device_id = self.device_id
        out.path = self.path if path is None else path
        out.content_type = self.content_type if content_type is None else content_type
        out.timestamp = self.timestamp if timestamp is None else timestamp
        out.metadata = self.metadata if metadata is None else metadata
        out._payload = new_payload
        out._json = new_json
        out._safe_strings = safe_strings
        out._safe_encoded = safe_encoded
        out._json_safe_text = json_safe_text
        return out

    def __repr__(self) -> str:
        size = len(self._payload) if self._payload is not None else "json"
        return (f"Message(id={self.id!r}, device={self.device_id!r}, path={self.path!r}, "
                f"content_type={self.content_type!r}, payload={size})")
