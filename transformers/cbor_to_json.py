"""``cbor-to-json``: decode one CBOR data item (``application/cbor``) into JSON.

CBOR holds more than JSON can; the mapping (ours, Golioth does not document one):
byte strings → standard base64 strings, tagged values → their content (date/time tags →
RFC 3339 strings), non-string map keys → their JSON text, undefined and other simple
values → null, NaN and ±Infinity → null. Bytes left over after the item are a failure.
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import cbor2

from pipelines.components import Transformer, TransformError
from pipelines.message import Message
from transformers.base import require_content_type
from transformers.registry import register


def to_json_value(value: Any) -> Any:
    """Map a decoded CBOR value onto JSON types (see the module docstring)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_value(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | Fraction):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, cbor2.CBORTag):
        return to_json_value(value.value)
    # undefined, CBORSimpleValue, and whatever else a tag decoder may produce
    if value is cbor2.undefined or isinstance(value, cbor2.CBORSimpleValue):
        return None
    return str(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    converted = to_json_value(key)
    return converted if isinstance(converted, str) else json.dumps(converted, separators=(",", ":"))


@register
class CborToJson(Transformer):
    deterministic = True
    type = "cbor-to-json"
    version = "1.0.0"
    summary = "Decode a CBOR payload into JSON."
    accepts = ("application/cbor",)

    def transform_sync(self, message: Message) -> Message:
        require_content_type(self, message)
        payload = message.payload
        if not payload:
            raise TransformError("cbor-to-json: payload is empty, not CBOR")
        stream = io.BytesIO(payload)
        try:
            value = cbor2.CBORDecoder(stream).decode()
        except Exception as exc:  # cbor2 raises CBORDecodeError and, for some inputs, others
            raise TransformError(f"cbor-to-json: payload is not valid CBOR ({exc})") from None
        left = len(payload) - stream.tell()
        if left:
            raise TransformError(f"cbor-to-json: {left} bytes left over after the CBOR data item")
        return message.evolve(json=to_json_value(value))
