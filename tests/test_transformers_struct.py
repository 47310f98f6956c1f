"""struct-to-json: little-endian packed structs, member validation at load time."""

from __future__ import annotations

import json
import struct

import pydantic
import pytest

from pipelines.components import ComponentContext, TransformError
from pipelines.message import Message
from transformers.registry import registry

GOLIOTH_BYTES = bytes.fromhex("0000bc41 68656c6c 6f 08 476f6c696f746821")


def make(params: dict):
    cls = registry.resolve("struct-to-json", "v1")
    return cls(cls.Params.model_validate(params), ComponentContext())


def msg(payload: bytes, content_type: str = "application/octet-stream") -> Message:
    return Message.new(device_id="d", path="/s", content_type=content_type, payload=payload)


async def test_golioth_doc_example_with_length_field():
    t = make({"members": [
        {"name": "temperature", "type": "float"},
        {"name": "string1", "type": "string", "length": 5},
        {"name": "string2_len", "type": "u8"},
        {"name": "string2", "type": "string", "lengthField": "string2_len"},
    ]})
    out = await t.transform(msg(GOLIOTH_BYTES))
    assert out.content_type == "application/json"
    assert json.loads(out.payload) == {"temperature": 23.5, "string1": "hello", "string2_len": 8,
                                       "string2": "Golioth!"}
    assert list(out.json()) == ["temperature", "string1", "string2_len", "string2"]


async def test_golioth_doc_example_as_written_with_length_naming_a_member():
    # Golioth's page writes `length: string2_len`; a pipeline copied from it must work
    t = make({"members": [
        {"name": "temperature", "type": "float"},
        {"name": "string1", "type": "string", "length": 5},
        {"name": "string2_len", "type": "u8"},
        {"name": "string2", "type": "string", "length": "string2_len"},
    ]})
    assert (await t.transform(msg(GOLIOTH_BYTES))).json()["string2"] == "Golioth!"


async def test_every_numeric_type_little_endian():
    members = [{"name": n, "type": n} for n in
               ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "float", "double")]
    values = (255, -128, 65535, -32768, 2**32 - 1, -(2**31), 2**64 - 1, -(2**63), -1.5, 3.141592653589793)
    payload = struct.pack("<BbHhIiQqfd", *values)
    out = await make({"members": members}).transform(msg(payload))
    assert out.json() == dict(zip([m["name"] for m in members], values, strict=True))


async def test_trailing_bytes_are_ignored_and_zero_length_strings_work():
    t = make({"members": [{"name": "n", "type": "u16"}, {"name": "s", "type": "string", "length": 0}]})
    assert (await t.transform(msg(b"\x01\x02\xff\xff"))).json() == {"n": 0x0201, "s": ""}


async def test_non_finite_floats_become_null():
    t = make({"members": [{"name": "a", "type": "float"}, {"name": "b", "type": "double"}]})
    out = await t.transform(msg(struct.pack("<fd", float("nan"), float("-inf"))))
    assert json.loads(out.payload) == {"a": None, "b": None}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00\x00\xbc", "input is 3 bytes, too short for member 'temperature' \\(float at offset 0\\)"),
    (GOLIOTH_BYTES[:8], "too short for member 'string1' \\(5 bytes at offset 4\\)"),
    (GOLIOTH_BYTES[:-1], "too short for member 'string2' \\(8 bytes at offset 10\\)"),
    (GOLIOTH_BYTES[:4] + b"\xff\xfe\xfd\xfc\xfb" + GOLIOTH_BYTES[9:], "'string1' is not valid UTF-8"),
    (b"", "input is 0 bytes"),
])
async def test_bad_input_fails_clearly(payload, reason):
    t = make({"members": [
        {"name": "temperature", "type": "float"},
        {"name": "string1", "type": "string", "length": 5},
        {"name": "string2_len", "type": "u8"},
        {"name": "string2", "type": "string", "lengthField": "string2_len"},
    ]})
    with pytest.raises(TransformError, match=f"struct-to-json: .*{reason}"):
        await t.transform(msg(payload))


async def test_negative_signed_length_field_fails():
    t = make({"members": [{"name": "n", "type": "i8"}, {"name": "s", "type": "string", "lengthField": "n"}]})
    with pytest.raises(TransformError, match="negative"):
        await t.transform(msg(b"\xff"))


async def test_refuses_other_content_types():
    t = make({"members": [{"name": "a", "type": "u8"}]})
    with pytest.raises(TransformError,
                       match="expects application/octet-stream input, got 'application/json'"):
        await t.transform(msg(b"1", "application/json"))


@pytest.mark.parametrize(("members", "reason"), [
    ([{"name": "a", "type": "u128"}], "unknown member type 'u128'; known types: u8, i8"),
    ([{"name": "a", "type": "string"}], "needs exactly one of length or lengthField"),
    ([{"name": "n", "type": "u8"}, {"name": "a", "type": "string", "length": 3, "lengthField": "n"}],
     "needs exactly one of length or lengthField"),
    ([{"name": "a", "type": "string", "lengthField": "n"}, {"name": "n", "type": "u8"}],
     "lengthField 'n' must name an integer member that comes before it"),
    ([{"name": "a", "type": "string", "lengthField": "a"}], "must name an integer member that comes before"),
    ([{"name": "f", "type": "float"}, {"name": "a", "type": "string", "lengthField": "f"}],
     "lengthField 'f' is a float, not an integer type"),
    ([{"name": "a", "type": "string", "length": -1}], "must not be negative"),
    ([{"name": "a", "type": "u8", "length": 2}], "apply only to string members"),
    ([{"name": "a", "type": "u8"}, {"name": "a", "type": "u16"}], "'a' is used twice"),
    ([{"name": "a", "type": "u8", "size": 1}], "xtra"),
    ([{"type": "u8"}], "name"),
    ([], "at least 1"),
])
def test_members_are_validated_at_load_time(members, reason):
    cls = registry.resolve("struct-to-json", "v1")
    with pytest.raises(pydantic.ValidationError, match=reason):
        cls.Params.model_validate({"members": members})
