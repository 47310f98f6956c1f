"""``struct-to-json``: decode a packed little-endian C struct (``application/octet-stream``)
into a JSON object, one key per member, in order.

Pipeline step (Golioth's documented example)::

    transformer:
      type: struct-to-json
      parameters:
        members:
          - {name: temperature, type: float}
          - {name: string1, type: string, length: 5}
          - {name: string2_len, type: u8}
          - {name: string2, type: string, lengthField: string2_len}

Types: u8 i8 u16 i16 u32 i32 u64 i64 float double string. A string takes a fixed ``length``
or the value of an earlier integer member named by ``lengthField``; strings are not
NUL-terminated and must be UTF-8. Golioth's own documentation example writes
``length: string2_len``: a ``length`` that is a member name is read as ``lengthField``.
Members are checked at load time. Input shorter than the members need is a failure; bytes
after the last member are ignored (a struct sent with ``sizeof`` may carry tail padding).
NaN and infinite floats become null.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.components import Transformer, TransformError
from pipelines.message import Message
from transformers.base import require_content_type
from transformers.registry import register

NUMBER_FORMATS = {
    "u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I", "i32": "<i",
    "u64": "<Q", "i64": "<q", "float": "<f", "double": "<d",
}
INTEGER_TYPES = {t for t in NUMBER_FORMATS if t[0] in "ui"}
TYPES = (*NUMBER_FORMATS, "string")


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="The JSON key for this member.",
                      examples=["temperature"])
    type: str = Field(description="One of " + ", ".join(TYPES) + ".", examples=["float", "string"])
    length: int | str | None = Field(
        default=None, examples=[5],
        description="string only: fixed length in bytes (a member name here is read as lengthField, "
                    "as in Golioth's own example).")
    lengthField: str | None = Field(  # Golioth's spelling
        default=None, description="string only: name of an earlier integer member holding the length.",
        examples=["string2_len"])

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TYPES:
            raise ValueError(f"unknown member type {value!r}; known types: {', '.join(TYPES)}")
        return value

    @model_validator(mode="after")
    def _length(self) -> Member:
        if isinstance(self.length, str):
            if self.length.strip().isdigit():
                self.length = int(self.length)
            elif self.lengthField is None:
                # Golioth's doc example spells lengthField as `length: <member name>`
                self.lengthField, self.length = self.length, None
            else:
                raise ValueError(f"member {self.name!r}: length must be a number")
        if self.type == "string":
            if (self.length is None) == (self.lengthField is None):
                raise ValueError(f"string member {self.name!r} needs exactly one of length or lengthField")
            if self.length is not None and self.length < 0:
                raise ValueError(f"member {self.name!r}: length must not be negative")
        elif self.length is not None or self.lengthField is not None:
            raise ValueError(f"member {self.name!r}: length and lengthField apply only to string members")
        return self


class StructParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: list[Member] = Field(
        min_length=1,
        description="The struct's members in memory order.",
        examples=[[{"name": "temperature", "type": "float"},
                   {"name": "label_len", "type": "u8"},
                   {"name": "label", "type": "string", "lengthField": "label_len"}]],
    )

    @model_validator(mode="after")
    def _references(self) -> StructParams:
        seen: dict[str, str] = {}
        for member in self.members:
            if member.name in seen:
                raise ValueError(f"member name {member.name!r} is used twice")
            ref = member.lengthField
            if ref is not None:
                if ref not in seen:
                    raise ValueError(f"string member {member.name!r}: lengthField {ref!r} must name an "
                                     "integer member that comes before it")
                if seen[ref] not in INTEGER_TYPES:
                    raise ValueError(f"string member {member.name!r}: lengthField {ref!r} is a "
                                     f"{seen[ref]}, not an integer type")
            seen[member.name] = member.type
        return self


def decode_struct(members: list[Member], data: bytes) -> dict[str, Any]:
    """Decode ``data`` per ``members``. Raises ValueError with a short reason."""
    out: dict[str, Any] = {}
    offset = 0
    for member in members:
        if member.type == "string":
            size = member.length if member.length is not None else out[member.lengthField or ""]
            if size < 0:
                raise ValueError(f"member {member.name!r}: its length {member.lengthField!r} "
                                 f"is negative ({size})")
            raw = data[offset: offset + size]
            if len(raw) < size:
                raise ValueError(f"input is {len(data)} bytes, too short for member {member.name!r} "
                                 f"({size} bytes at offset {offset})")
            try:
                out[member.name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"member {member.name!r} is not valid UTF-8") from None
            offset += size
        else:
            fmt = NUMBER_FORMATS[member.type]
            size = struct.calcsize(fmt)
            if offset + size > len(data):
                raise ValueError(f"input is {len(data)} bytes, too short for member {member.name!r} "
                                 f"({member.type} at offset {offset})")
            (value,) = struct.unpack_from(fmt, data, offset)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[member.name] = value
            offset += size
    return out


@register
class StructToJson(Transformer):
    deterministic = True
    type = "struct-to-json"
    version = "1.0.0"
    summary = "Decode a packed little-endian C struct into a JSON object using a member list."
    accepts = ("application/octet-stream",)
    Params = StructParams

    def transform_sync(self, message: Message) -> Message:
        require_content_type(self, message)
        try:
            doc = decode_struct(self.params.members, message.payload)
        except ValueError as exc:
            raise TransformError(f"struct-to-json: {exc}") from None
        return message.evolve(json=doc)
