"""The JSON transformers: inject-path, inject-metadata, extract-timestamp, cbor-to-json."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import cbor2
import pytest

from pipelines.components import ComponentContext, TransformError
from pipelines.message import Message
from transformers.registry import registry

WHEN = datetime(2022, 3, 18, 17, 25, 8, 346519, tzinfo=UTC)


def make(type_: str, params: dict | None = None):
    cls = registry.resolve(type_, "v1")
    return cls(cls.Params.model_validate(params or {}), ComponentContext())


def msg(payload: bytes, content_type: str = "application/json", path: str = "/sensor0/temp") -> Message:
    return Message.new(device_id="12345678987654321", project_id="my-first-project", path=path,
                       content_type=content_type, payload=payload, timestamp=WHEN)


@pytest.mark.parametrize("name", ["inject-path", "inject-metadata", "extract-timestamp"])
async def test_json_transformers_refuse_other_content_types(name):
    with pytest.raises(TransformError, match=r"expects application/json input, got 'application/cbor'"):
        await make(name).transform(msg(b'{"a":1}', "application/cbor"))


@pytest.mark.parametrize("name", ["inject-path", "inject-metadata", "extract-timestamp"])
async def test_json_transformers_report_invalid_json(name):
    with pytest.raises(TransformError, match=f"{name}: payload is not valid JSON"):
        await make(name).transform(msg(b'{"a":'))


async def test_json_types_with_parameters_and_suffix_are_json():
    out = await make("inject-path").transform(msg(b"1", "application/vnd.x+json; charset=utf-8", "/a"))
    assert out.json() == {"a": 1}


# inject-path (Golioth doc example) -------------------------------------------------------


async def test_inject_path_golioth_example():
    out = await make("inject-path").transform(msg(b'{"celsius": 32}'))
    assert out.path == "/sensor0/temp" and out.content_type == "application/json"
    assert json.loads(out.payload) == {"sensor0": {"temp": {"celsius": 32}}}


@pytest.mark.parametrize(("path", "expected"), [
    ("/", [1]), ("", [1]), ("/a//b/", {"a": {"b": [1]}}),
    ("/data/block_upload", {"data": {"block_upload": [1]}}),
])
async def test_inject_path_edge_paths(path, expected):
    out = await make("inject-path").transform(msg(b"[1]", path=path))
    assert out.json() == expected


# inject-metadata (Golioth doc example) ---------------------------------------------------


async def test_inject_metadata_golioth_example():
    out = await make("inject-metadata").transform(msg(b'{"temp": 32}'))
    assert json.loads(out.payload) == {
        "data": {"temp": 32},
        "device_id": "12345678987654321",
        "project_id": "my-first-project",
        "timestamp": {"nanos": 346519000, "seconds": 1647624308},
    }


async def test_inject_metadata_before_1970_has_positive_nanos():
    m = msg(b"null").evolve(timestamp=datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC))
    out = await make("inject-metadata").transform(m)
    assert out.json()["timestamp"] == {"seconds": -1, "nanos": 500000000}


async def test_consecutive_json_steps_do_not_mutate_the_shared_document():
    original = msg(b'{"temp": 32}')
    doc = original.json()
    out = await make("inject-path").transform(original)
    out = await make("inject-metadata").transform(out)
    assert doc == {"temp": 32} and out.json()["data"] == {"sensor0": {"temp": {"temp": 32}}}


# extract-timestamp -----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("ts", "2022-12-08T20:45:47+00:00", datetime(2022, 12, 8, 20, 45, 47, tzinfo=UTC)),
    ("t", "2022-12-08T22:45:47.25+02:00", datetime(2022, 12, 8, 20, 45, 47, 250000, tzinfo=UTC)),
    ("time", "2022-12-08T20:45:47Z", datetime(2022, 12, 8, 20, 45, 47, tzinfo=UTC)),
    ("timestamp", "2022-12-08T20:45:47", datetime(2022, 12, 8, 20, 45, 47, tzinfo=UTC)),
    ("ts", 1626362266059, datetime(2021, 7, 15, 15, 17, 46, 59000, tzinfo=UTC)),
    ("ts", 1626362266, datetime(2021, 7, 15, 15, 17, 46, tzinfo=UTC)),
    ("ts", 1626362266.5, datetime(2021, 7, 15, 15, 17, 46, 500000, tzinfo=UTC)),
    ("ts", "1626362266059", datetime(2021, 7, 15, 15, 17, 46, 59000, tzinfo=UTC)),
    ("ts", 1626362266059123, datetime(2021, 7, 15, 15, 17, 46, 59123, tzinfo=UTC)),
    ("ts", 0, datetime(1970, 1, 1, tzinfo=UTC)),
])
async def test_extract_timestamp_formats(key, value, expected):
    out = await make("extract-timestamp").transform(msg(json.dumps({"temp": 32, key: value}).encode()))
    assert out.timestamp == expected
    assert json.loads(out.payload) == {"temp": 32}
    assert out.content_type == "application/json"


async def test_extract_timestamp_uses_the_first_key_in_order_and_removes_only_it():
    out = await make("extract-timestamp").transform(msg(b'{"timestamp": 5, "t": 1000, "v": 1}'))
    assert out.timestamp == datetime(1970, 1, 1, 0, 16, 40, tzinfo=UTC)
    assert out.json() == {"timestamp": 5, "v": 1}


@pytest.mark.parametrize("payload", [b'{"temp": 32}', b"[1, 2]", b"3", b'"ts"'])
async def test_extract_timestamp_without_a_key_leaves_the_message_alone(payload):
    m = msg(payload)
    out = await make("extract-timestamp").transform(m)
    assert out.timestamp == WHEN and out.payload == payload


@pytest.mark.parametrize(("value", "reason"), [
    ("yesterday", "neither Unix time nor ISO 8601"),
    (True, "got bool"),
    (None, "got NoneType"),
    ({"s": 1}, "got dict"),
    (1e300, "out of range"),
])
async def test_extract_timestamp_bad_values_fail_clearly(value, reason):
    with pytest.raises(TransformError, match=f"extract-timestamp: key 'ts': .*{reason}"):
        await make("extract-timestamp").transform(msg(json.dumps({"ts": value}).encode()))


async def test_extract_timestamp_keeps_the_original_document_intact():
    m = msg(b'{"ts": 1626362266, "v": 1}')
    await make("extract-timestamp").transform(m)
    assert m.json() == {"ts": 1626362266, "v": 1}


# cbor-to-json ----------------------------------------------------------------------------


async def test_cbor_to_json():
    data = {"temp": 21.5, "n": -3, "ok": True, "none": None, "list": [1, "a"], "nested": {"x": 1}}
    out = await make("cbor-to-json").transform(msg(cbor2.dumps(data), "application/cbor"))
    assert out.content_type == "application/json" and json.loads(out.payload) == data


async def test_cbor_values_json_cannot_hold_are_mapped():
    data = {1: b"\x00\xff", "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "nan": float("nan"),
            "tag": cbor2.CBORTag(4242, "v"), "undef": cbor2.undefined, "big": 2**70}
    out = await make("cbor-to-json").transform(msg(cbor2.dumps(data), "application/cbor"))
    assert json.loads(out.payload) == {"1": "AP8=", "when": "2024-01-02T03:04:05+00:00", "nan": None,
                                       "tag": "v", "undef": None, "big": 2**70}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty"),
    (b"\xff", "not valid CBOR"),
    (b"\xa1\x61", "not valid CBOR"),          # map with a truncated key
    (cbor2.dumps(1) + b"\x01", "1 bytes left over"),
])
async def test_cbor_to_json_rejects_invalid_cbor(payload, reason):
    with pytest.raises(TransformError, match=f"cbor-to-json: .*{reason}"):
        await make("cbor-to-json").transform(msg(payload, "application/cbor"))


async def test_cbor_to_json_refuses_other_content_types():
    with pytest.raises(TransformError, match="expects application/cbor input, got 'application/json'"):
        await make("cbor-to-json").transform(msg(cbor2.dumps(1), "application/json"))
