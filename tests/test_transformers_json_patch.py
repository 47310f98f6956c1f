"""json-patch: RFC 6902 with Golioth's leniencies, atomic tests, load-time validation."""

from __future__ import annotations

import json

import pydantic
import pytest

from pipelines.components import ComponentContext, TransformError
from pipelines.message import Message
from transformers.json_patch import json_equal, parse_pointer
from transformers.registry import registry


def make(type_: str, params: dict | None = None):
    cls = registry.resolve(type_, "v1")
    return cls(cls.Params.model_validate(params or {}), ComponentContext())


def patcher(*ops: dict):
    return make("json-patch", {"patch": json.dumps(list(ops))})


def msg(doc, device_id: str = "dev-1") -> Message:
    return Message.new(device_id=device_id, project_id="proj", path="/sensor0",
                       content_type="application/json", payload=json.dumps(doc).encode())


async def apply(doc, *ops: dict):
    return (await patcher(*ops).transform(msg(doc))).json()


async def test_golioth_doc_example():
    p = make("json-patch", {"patch": """
        [
          { "op": "replace", "path": "/temp", "value": 23.6847 },
          { "op": "add", "path": "/hello", "value": ["world"] },
          { "op": "remove", "path": "/lat" }
        ]"""})
    out = await p.transform(msg({"temp": 55.8324, "lat": 51.9977, "long": 0.7407}))
    assert out.content_type == "application/json"
    assert json.loads(out.payload) == {"temp": 23.6847, "long": 0.7407, "hello": ["world"]}


async def test_golioth_conditional_patch_example():
    """inject-metadata → conditional json-patch (test device_id) → remove metadata."""
    steps = [
        make("inject-metadata"),
        make("json-patch", {"patch": """
          [
            {"op": "test", "path": "/device_id", "value": "649998262fecb43eb2d39859"},
            {"op": "add", "path": "/demo", "value": true}
          ]"""}),
        make("json-patch", {"patch": """
          [
            {"op": "remove", "path": "/device_id"},
            {"op": "remove", "path": "/project_id"},
            {"op": "remove", "path": "/timestamp"}
          ]"""}),
    ]
    results = {}
    for device in ("649998262fecb43eb2d39859", "some-other-device"):
        current = msg({"temp": 21}, device_id=device)
        for step in steps:
            current = await step.transform(current)
        results[device] = json.loads(current.payload)
    assert results == {
        "649998262fecb43eb2d39859": {"data": {"temp": 21}, "demo": True},
        "some-other-device": {"data": {"temp": 21}},
    }


async def test_failed_test_leaves_the_message_unchanged_even_after_earlier_ops():
    m = msg({"a": 1})
    out = await patcher({"op": "add", "path": "/b", "value": 2},
                        {"op": "test", "path": "/a", "value": 2}).transform(m)
    assert out is m and m.json() == {"a": 1}


async def test_test_of_a_missing_path_is_a_failed_test_not_an_error():
    assert await apply({"a": 1}, {"op": "test", "path": "/zz", "value": 1},
                       {"op": "add", "path": "/b", "value": 1}) == {"a": 1}


async def test_test_equality_is_json_equality():
    doc = {"n": 1, "f": 1.0, "b": True, "o": {"x": [1, {"y": None}]}}
    ok = {"op": "add", "path": "/ok", "value": 1}
    assert "ok" in await apply(doc, {"op": "test", "path": "/f", "value": 1}, ok)
    assert "ok" in await apply(doc, {"op": "test", "path": "/o", "value": {"x": [1, {"y": None}]}}, ok)
    assert "ok" not in await apply(doc, {"op": "test", "path": "/n", "value": True}, ok)
    assert "ok" not in await apply(doc, {"op": "test", "path": "/b", "value": 1}, ok)
    assert json_equal([1, 2], [1, 2]) and not json_equal([1], [1, 2]) and not json_equal("1", 1)


async def test_remove_of_a_missing_path_is_ignored():
    assert await apply({"a": 1}, {"op": "remove", "path": "/nope"},
                       {"op": "remove", "path": "/x/y/z"}, {"op": "remove", "path": "/a"}) == {}


async def test_add_creates_missing_parent_objects():
    assert await apply({}, {"op": "add", "path": "/a/b/c", "value": 1}) == {"a": {"b": {"c": 1}}}


async def test_replicate_payload_shape_and_move_then_lenient_remove():
    out = await apply({"image": "data:..."},
                      {"op": "add", "path": "/version", "value": "v1"},
                      {"op": "add", "path": "/input", "value": {"image": ""}},
                      {"op": "move", "from": "/image", "path": "/input/image"},
                      {"op": "remove", "path": "/image"})
    assert out == {"version": "v1", "input": {"image": "data:..."}}


async def test_arrays_copy_replace_and_escaped_pointers():
    out = await apply({"a": [1, 2], "m~n": {"x/y": 1}},
                      {"op": "add", "path": "/a/1", "value": 9},
                      {"op": "add", "path": "/a/-", "value": 3},
                      {"op": "replace", "path": "/a/0", "value": 0},
                      {"op": "copy", "from": "/m~0n/x~1y", "path": "/copied"},
                      {"op": "remove", "path": "/a/3"},
                      {"op": "move", "from": "/a/0", "path": "/first"})
    assert out == {"a": [9, 2], "m~n": {"x/y": 1}, "copied": 1, "first": 0}


async def test_whole_document_ops():
    assert await apply({"a": 1}, {"op": "replace", "path": "", "value": [1]}) == [1]
    assert await apply({"a": 1}, {"op": "add", "path": "", "value": {"b": 2}}) == {"b": 2}


async def test_the_input_document_is_never_mutated():
    m = msg({"nested": {"list": [1]}})
    doc = m.json()
    value = {"v": [1]}
    p = patcher({"op": "add", "path": "/nested/list/-", "value": value},
                {"op": "add", "path": "/nested/x", "value": 1})
    out1 = await p.transform(m)
    out1.json()["nested"]["list"][1]["v"].append(2)   # a later step mutating its copy
    out2 = await p.transform(m)
    assert doc == {"nested": {"list": [1]}}
    assert out2.json() == {"nested": {"list": [1, {"v": [1]}], "x": 1}}


@pytest.mark.parametrize(("ops", "reason"), [
    ([{"op": "replace", "path": "/nope", "value": 1}], r"operation 0 \(replace\): path /nope does not exist"),
    ([{"op": "move", "from": "/nope", "path": "/b"}], r"operation 0 \(move\): path /nope does not exist"),
    ([{"op": "copy", "from": "/a/5", "path": "/b"}], "index 5 is out of range"),
    ([{"op": "add", "path": "/a/7", "value": 1}], "index 7 is out of range"),
    ([{"op": "add", "path": "/a/x", "value": 1}], "'x' is not an array index"),
    ([{"op": "add", "path": "/a/01", "value": 1}], "'01' is not an array index"),
    ([{"op": "add", "path": "/s/x", "value": 1}], "/s is not an object or array"),
    ([{"op": "add", "path": "/b", "value": 1}, {"op": "remove", "path": ""}], r"operation 1 \(remove\)"),
])
async def test_apply_failures_are_transform_errors(ops, reason):
    with pytest.raises(TransformError, match=f"json-patch: .*{reason}"):
        await patcher(*ops).transform(msg({"a": [1, 2], "s": "str"}))


@pytest.mark.parametrize(("patch", "reason"), [
    ("not json", "patch is not valid JSON"),
    ('{"op": "add"}', "must be a JSON array of operations, got a JSON dict"),
    ("[1]", "patch operation 0 must be an object"),
    ('[{"op": "ad", "path": "/a", "value": 1}]', "\"op\" must be one of add, remove"),
    ('[{"path": "/a"}]', "\"op\" must be one of"),
    ('[{"op": "add", "value": 1}]', "\"path\" must be a string JSON pointer"),
    ('[{"op": "add", "path": "a", "value": 1}]', "must be empty or start with '/'"),
    ('[{"op": "add", "path": "/a~2", "value": 1}]', "'~' not followed by 0 or 1"),
    ('[{"op": "add", "path": "/a"}]', "\"value\" is required"),
    ('[{"op": "test", "path": "/a"}]', "\"value\" is required"),
    ('[{"op": "remove", "path": "/a"}, {"op": "move", "path": "/a"}]',
     "patch operation 1 \\(move\\): \"from\" must be a string"),
    ('[{"op": "move", "from": "/a", "path": "/a/b"}]', "into its own child"),
])
def test_bad_patches_are_rejected_at_load_time(patch, reason):
    cls = registry.resolve("json-patch", "v1")
    with pytest.raises(pydantic.ValidationError, match=reason):
        cls.Params.model_validate({"patch": patch})


@pytest.mark.parametrize("params", [{}, {"patch": [{"op": "add"}]}, {"patch": "[]", "extra": 1}])
def test_patch_parameter_shape(params):
    with pytest.raises(pydantic.ValidationError):
        registry.resolve("json-patch").Params.model_validate(params)


async def test_empty_patch_is_valid_and_keeps_the_document():
    assert await apply({"a": 1}) == {"a": 1}


async def test_deeply_nested_json_is_a_clean_transform_error():
    m = Message.new(device_id="d", path="/x", content_type="application/json", payload=b"[" * 100_000)
    with pytest.raises(TransformError, match="json-patch: payload is not usable JSON: nested too deeply"):
        await patcher({"op": "add", "path": "/a", "value": 1}).transform(m)


async def test_json_patch_refuses_non_json_content():
    m = Message.new(device_id="d", path="/x", content_type="application/octet-stream", payload=b"{}")
    with pytest.raises(TransformError, match="json-patch expects application/json input"):
        await patcher().transform(m)


def test_parse_pointer():
    assert parse_pointer("") == ()
    assert parse_pointer("/") == ("",)
    assert parse_pointer("/a~1b/~0/0") == ("a/b", "~", "0")
