"""The step runner (spec §3-§4): the three step rules, several matching pipelines, unmatched
messages recorded, and a failing transformer dead-lettering only its own pipeline."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.components import ComponentContext
from pipelines.config import load_pipelines
from pipelines.engine import Engine, build_pipelines, rebuild_message
from pipelines.message import Message
from pipelines.secrets import SecretSource
from pipelines.store import Store, books_gaps


def engine_for(tmp: Path, pipelines: dict) -> Engine:
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
    loaded = load_pipelines([path], SecretSource.from_sources(None))
    assert not loaded.problems, loaded.problems
    return Engine(build_pipelines(loaded.pipelines, lambda pc, sc: ComponentContext(pipeline=pc.name,
                                                                                   step=sc.name)))


def relabel(ct: str) -> dict:
    return {"type": "change-content-type", "version": "v1", "parameters": {"content_type": ct}}


def hook(name: str) -> dict:
    return {"type": "webhook", "version": "v1", "parameters": {"url": f"http://127.0.0.1:9/{name}"}}


def message(payload: bytes = b'{"t": 1}', path: str = "/data", ct: str = "application/json") -> Message:
    return Message.new(device_id="dev-1", path=path, content_type=ct, payload=payload)


async def test_the_three_step_rules(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {"p": {"steps": [
        {"name": "d0", "destination": hook("d0")},                                # destination only
        {"name": "t1", "transformer": relabel("text/t1")},                       # transformer only
        {"name": "d2", "destination": hook("d2")},
        {"name": "both", "transformer": relabel("text/both"), "destination": hook("both")},
        {"name": "d4", "destination": hook("d4")},
    ]}})
    m = message()
    outcome, trace = await engine.route(m, trace=True)
    got = {d.step: d.message for d in outcome.deliveries}
    assert list(got) == ["d0", "d2", "both", "d4"]
    assert got["d0"].content_type == "application/json"   # delivered as it came...
    assert got["d2"].content_type == "text/t1"            # ...and the transform replaced it after
    assert got["both"].content_type == "text/both"        # both: only this destination sees it
    assert got["d4"].content_type == "text/t1"            # later steps get it as before "both"
    assert all(d.message.id == m.id for d in outcome.deliveries)
    assert got["d0"].payload is m.payload and got["d4"].payload is m.payload  # no copies
    assert (outcome.matched, outcome.runs_completed, outcome.runs_dead, outcome.dead) == (True, 1, 0, [])
    assert [(t.step, t.action) for t in trace] == [
        ("d0", "enqueued"), ("t1", "transformed"), ("d2", "enqueued"),
        ("both", "transformed"), ("both", "enqueued"), ("d4", "enqueued")]


def webhook_transformer() -> dict:
    return {"type": "webhook", "version": "v1", "parameters": {"url": "http://127.0.0.1:9/t"}}


async def test_deliveries_after_deterministic_steps_carry_the_routed_message(tmp_path: Path) -> None:
    """The store keeps a frame once: a delivery whose request only deterministic
    transformers made carries the routed message as its source, from which the request is
    made again at delivery, the same as the engine computed; after any other transformer
    there is no source (the request itself is stored)."""
    steps = [
        {"name": "t0", "transformer": relabel("text/t0")},
        {"name": "d1", "destination": hook("d1")},
        {"name": "both", "transformer": relabel("text/both"), "destination": hook("both")},
        {"name": "d3", "destination": hook("d3")},
    ]
    engine = engine_for(tmp_path, {"p": {"steps": steps}})
    m = message()
    outcome, _ = await engine.route(m)
    assert [(d.step, d.rebuild) for d in outcome.deliveries] == [("d1", True), ("both", True), ("d3", True)]
    assert all(d.source is m for d in outcome.deliveries)
    runtime = engine.by_name["p"]
    rebuilt = [await rebuild_message(runtime, d.step_index, d.step, m) for d in outcome.deliveries]
    stored = engine_for(tmp_path, {"p": {"steps": steps}})
    stored.rebuild = False
    plain, _ = await stored.route(m)
    assert [d.rebuild for d in plain.deliveries] == [False] * 3
    assert [(r.content_type, r.payload, r.id) for r in rebuilt] == [
        (d.message.content_type, d.message.payload, d.message.id) for d in plain.deliveries] == [
        (d.message.content_type, d.message.payload, d.message.id) for d in outcome.deliveries]
    assert [r.content_type for r in rebuilt] == ["text/t0", "text/both", "text/t0"]

    # a transformer that is not deterministic (it calls out) ends it for the later steps
    engine = engine_for(tmp_path, {"p": {"steps": [
        {"name": "d0", "destination": hook("d0")},
        {"name": "t1", "transformer": relabel("text/t1")},
        {"name": "d2", "destination": hook("d2")},
        {"name": "t3", "transformer": webhook_transformer()},
        {"name": "d4", "destination": hook("d4")},
    ]}})
    outcome, _ = await engine.route(m)
    assert [(d.step, d.rebuild) for d in outcome.deliveries] == [("d0", False), ("d2", True)]
    assert outcome.dead and outcome.dead[0].step == "t3"  # nothing listens at port 9


async def test_several_pipelines_match_independently_and_disabled_ones_do_not(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {
        "all": {"steps": [{"name": "d", "destination": hook("all")}]},
        "data": {"filter": {"path": "/data", "content_type": "application/json"},
                 "steps": [{"name": "t", "transformer": relabel("text/x")},
                           {"name": "d", "destination": hook("data")}]},
        "prefix": {"filter": {"path": "/da*"}, "steps": [{"name": "d", "destination": hook("prefix")}]},
        "other": {"filter": {"path": "/other"}, "steps": [{"name": "d", "destination": hook("other")}]},
        "off": {"enabled": False, "steps": [{"name": "d", "destination": hook("off")}]},
    })
    outcome, _ = await engine.route(message())
    assert sorted(d.pipeline for d in outcome.deliveries) == ["all", "data", "prefix"]
    assert {d.pipeline: d.message.content_type for d in outcome.deliveries}["all"] == "application/json"
    assert outcome.runs_completed == 3
    outcome, _ = await engine.route(message(path="/zzz", ct="text/plain"))
    assert [d.pipeline for d in outcome.deliveries] == ["all"]


async def test_unmatched_messages_are_recorded_not_dropped(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {"only": {"filter": {"path": "/images"},
                                            "steps": [{"name": "d", "destination": hook("d")}]}})
    m = message(path="/temperature")
    outcome, _ = await engine.route(m)
    assert outcome.matched is False and outcome.deliveries == []
    async with Store(tmp_path / "s.db") as store:
        await store.add_inbox(m)
        await store.finish_message(m, outcome)
        [row] = await store.unmatched()
        assert (row["message_id"], row["path"]) == (m.id, "/temperature")
        assert row["content_type"] == "application/json"
        books = await store.counters()
        assert books["unmatched"] == 1 and books["inbox"] == 0 and not any(books_gaps(books).values())


async def test_a_failing_transformer_dead_letters_its_pipeline_only(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {
        "fragile": {"steps": [
            {"name": "early", "destination": hook("early")},
            {"name": "label", "transformer": relabel("application/x-labelled")},
            {"name": "wrap", "transformer": {"type": "embed-in-json", "version": "v1",
                                             "parameters": {"key": "text"}}},
            {"name": "late", "destination": hook("late")}]},
        "sturdy": {"steps": [{"name": "d", "destination": hook("sturdy")}]},
    })
    m = message(payload=b"\xff\xfe not utf-8", ct="application/octet-stream")
    outcome, trace = await engine.route(m, trace=True)
    assert sorted((d.pipeline, d.step) for d in outcome.deliveries) == [("fragile", "early"), ("sturdy", "d")]
    [dead] = outcome.dead
    assert (dead.pipeline, dead.step, dead.step_index, dead.stage) == ("fragile", "wrap", 2, "transform")
    assert "UTF-8" in dead.error or "utf-8" in dead.error
    # the letter keeps the message as the failing step received it, bytes untouched
    assert dead.message.payload == m.payload and dead.message.content_type == "application/x-labelled"
    assert dead.message.id == m.id
    assert (outcome.runs_completed, outcome.runs_dead) == (1, 1)
    assert engine.transform_failed == {("fragile", "wrap"): 1}
    assert ("wrap", "failed") in [(t.step, t.action) for t in trace]

    async with Store(tmp_path / "s.db") as store:
        await store.add_inbox(m)
        await store.finish_message(m, outcome)
        [letter] = await store.dead_letters()
        assert letter.stage == "transform" and letter.message.payload == m.payload
        books = await store.counters()
        assert books["runs_dead"] == 1 and books["dead_letters"] == 1 and books["deliveries_enqueued"] == 2
        assert not any(books_gaps(books).values())

    # replay from the failing step with a message it can take: the run completes from there on
    fixed = dead.message.evolve(payload=b"now text")
    deliveries, dead_again, _ = await engine.run_pipeline(engine.by_name["fragile"], fixed, dead.step_index)
    assert dead_again == [] and [d.step for d in deliveries] == ["late"]
    assert deliveries[0].message.json() == {"text": "now text"}
