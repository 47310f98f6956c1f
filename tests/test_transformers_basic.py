"""The byte-level transformers (change-content-type, data-url, embed-in-json, base64) and the
registry entries of every transformer."""

from __future__ import annotations

import base64
import json

import pydantic
import pytest

from pipelines.components import ComponentContext, TransformError
from pipelines.message import Message
from transformers.registry import registry

ALL_TYPES = ["base64", "cbor-to-json", "change-content-type", "data-url", "embed-in-json",
             "extract-timestamp", "inject-metadata", "inject-path", "json-patch", "struct-to-json",
             "webhook"]


def make(type_: str, params: dict | None = None):
    cls = registry.resolve(type_, "v1")
    return cls(cls.Params.model_validate(params or {}), ComponentContext())


def msg(payload: bytes, content_type: str = "application/octet-stream") -> Message:
    return Message.new(device_id="d1", project_id="p1", path="/x", content_type=content_type,
                       payload=payload)


def test_every_spec_transformer_is_registered_with_a_documented_params_model():
    assert set(ALL_TYPES) <= set(registry.names())
    for name in ALL_TYPES:
        cls = registry.resolve(name)
        assert cls.type == name and cls.version == "1.0.0" and cls.kind == "transformer"
        assert cls.summary
        assert cls.Params.model_config.get("extra") == "forbid"
        for field_name, info in cls.Params.model_fields.items():
            assert info.description, f"{name}.{field_name} has no description"
            assert info.examples, f"{name}.{field_name} has no examples"
    with pytest.raises(LookupError, match="not supported"):
        registry.resolve("location")


@pytest.mark.parametrize("name", ["change-content-type", "data-url", "base64", "inject-path"])
def test_unknown_parameters_are_rejected(name):
    cls = registry.resolve(name)
    with pytest.raises(pydantic.ValidationError, match="xtra"):
        cls.Params.model_validate({"content_type": "a/b", "bogus": 1})


# change-content-type ---------------------------------------------------------------------


async def test_change_content_type_relabels_and_keeps_bytes():
    payload = bytes(range(256))
    out = await make("change-content-type", {"content_type": "image/png"}).transform(msg(payload))
    assert out.content_type == "image/png" and out.payload == payload


@pytest.mark.parametrize("params", [{}, {"content_type": ""}, {"content_type": "png"},
                                    {"content_type": 5}])
def test_change_content_type_needs_a_mime_type(params):
    with pytest.raises(pydantic.ValidationError, match="content_type"):
        registry.resolve("change-content-type").Params.model_validate(params)


# data-url --------------------------------------------------------------------------------


async def test_data_url():
    payload = b"\x89PNG\r\n\x1a\n\x00\xff"
    out = await make("data-url").transform(msg(payload, "image/png"))
    assert out.content_type == "text/plain"
    assert out.payload == b"data:image/png;base64," + base64.b64encode(payload)


async def test_data_url_keeps_mime_parameters_and_handles_empty_payload():
    out = await make("data-url").transform(msg(b"", "text/plain; charset=utf-8"))
    assert out.payload == b"data:text/plain;charset=utf-8;base64,"


# embed-in-json ---------------------------------------------------------------------------


async def test_embed_in_json_escapes_text():
    text = 'He said "hi"\n\\ é 🌡'
    out = await make("embed-in-json", {"key": "text"}).transform(msg(text.encode(), "text/plain"))
    assert out.content_type == "application/json"
    assert json.loads(out.payload) == {"text": text}


async def test_embed_in_json_rejects_invalid_utf8():
    with pytest.raises(TransformError, match=r"not valid UTF-8 \(byte 2\).*base64"):
        await make("embed-in-json", {"key": "k"}).transform(msg(b"ab\xff\xfe"))


@pytest.mark.parametrize("params", [{}, {"key": ""}, {"key": ["a"]}])
def test_embed_in_json_needs_a_key(params):
    with pytest.raises(pydantic.ValidationError, match="key"):
        registry.resolve("embed-in-json").Params.model_validate(params)


# base64 ----------------------------------------------------------------------------------


async def test_base64_encode_and_decode_round_trip():
    payload = bytes(range(256))
    enc = await make("base64").transform(msg(payload))
    assert enc.content_type == "text/plain" and enc.payload == base64.b64encode(payload)
    dec = await make("base64", {"decode": True}).transform(enc.evolve(payload=enc.payload + b"\n"))
    assert dec.content_type == "application/octet-stream" and dec.payload == payload


@pytest.mark.parametrize("bad", [b"abc", b"ab!d", b"YWJj ZA==", b"YWJjZA", b"-_-_"])
async def test_base64_decode_rejects_bad_input(bad):
    with pytest.raises(TransformError, match="not valid padded standard base64"):
        await make("base64", {"decode": True}).transform(msg(bad, "text/plain"))


def test_base64_decode_must_be_a_bool():
    with pytest.raises(pydantic.ValidationError, match="decode"):
        registry.resolve("base64").Params.model_validate({"decode": "yes"})
