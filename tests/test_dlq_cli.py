"""``pipeline dlq list|show|replay|purge`` against a store a real router filled.

A webhook transformer and a webhook destination fail permanently (400 and 404) so dead
letters of both stages exist; the CLI lists and filters them, shows one byte for byte,
replays them after the receivers are fixed (the transformer's letters from the step that
failed, not from the start) and a restarted router delivers them under their old ids.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from delivery_sink import Answer, Sink
from test_delivery_faults import wait_for

from pipelines.cli import main
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from pipelines.store import Store, books_gaps

ROOT = Path(__file__).resolve().parents[1]


def pipelines_file(tmp: Path, sink: Sink) -> Path:
    fast = {"initial_backoff": 0.05, "max_backoff": 0.2, "max_attempts": 3}
    doc = {"pipelines": {
        "cam": {"filter": {"path": "/img"}, "steps": [
            {"name": "first", "transformer": {"type": "webhook", "parameters": {"url": sink.url("/first")}}},
            {"name": "enrich", "retry": fast,
             "transformer": {"type": "webhook", "parameters": {"url": sink.url("/enrich")}}},
            {"name": "out", "retry": fast,
             "destination": {"type": "webhook", "parameters": {"url": sink.url("/out")}}}]},
        "log": {"steps": [
            {"name": "hook", "retry": fast,
             "destination": {"type": "webhook", "parameters": {"url": sink.url("/log")}}}]}}}
    path = tmp / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def broken_then_fixed(tmp_path: Path):
    state = {"fixed": False}
    with Sink() as sink:
        sink.answer("/first", lambda n: Answer(200, {"content-type": "application/x-first"}, b"first:x"))
        sink.answer("/enrich", lambda n: Answer(200, {"content-type": "application/json"}, b'{"ok": true}')
                    if state["fixed"] else Answer(400, body=b"bad input"))
        sink.answer("/log", lambda n: Answer(204) if state["fixed"] else Answer(404, body=b"no such hook"))
        yield sink, state


async def fill_store(tmp_path: Path, sink: Sink) -> tuple[Path, Path, list[Message]]:
    pf, store = pipelines_file(tmp_path, sink), tmp_path / "store.db"
    msgs = [Message.new(device_id=dev, path="/img", content_type="image/png",
                        payload=bytes([137, 80, 78, 71, i, 0, 255]) * 50, metadata={"n": i})
            for i, dev in enumerate(["dev-a", "dev-b", "dev-a"])]
    async with Router(RouterSettings(pipelines=[pf], store_path=store)) as router:
        for m in msgs:
            await router.accept(m)

        async def six() -> bool:
            return (await router.store.counters())["dead_letters_open"] == 6
        await wait_for(six, 10, "six dead letters")
    return pf, store, msgs


async def test_list_show_filters_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            broken_then_fixed) -> None:
    sink, _ = broken_then_fixed
    _, store, msgs = await fill_store(tmp_path, sink)
    s = str(store)

    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s)
    assert code == 0 and out.strip().endswith("6 dead letters")
    assert "cam/enrich" in out and "log/hook" in out and "transform" in out and "delivery" in out
    assert " 404 " in out and "no such hook" not in out  # the table shows the error, not the answer

    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s, "--json",
                                           "--pipeline", "log", "--device", "dev-a")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2
    assert {r["device_id"] for r in rows} == {"dev-a"} and {r["step"] for r in rows} == {"hook"}
    assert all(r["last_status"] == 404 and r["attempts"] == 1 and r["response_excerpt"] == "no such hook"
               for r in rows)
    assert {r["message_id"] for r in rows} == {msgs[0].id, msgs[2].id}

    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s, "--since", "1h",
                                           "--step", "enrich")
    assert out.strip().endswith("3 dead letters")
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s,
                                           "--until", "2001-01-01T00:00:00Z")
    assert code == 0 and "no dead letters match" in out

    async with Store(store) as st:
        letter = (await st.dead_letters(pipeline="log", device_id="dev-b"))[0]
    out_file = tmp_path / "payload.bin"
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "show", "--store", s, str(letter.id))
    assert code == 0 and "89 50 4e 47" not in out and "--payload shows it" in out  # only on request
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "show", "--store", s, str(letter.id),
                                           "--payload", "--payload-out", str(out_file))
    assert code == 0
    assert out_file.read_bytes() == msgs[1].payload  # the exact bytes
    assert "content_type:     image/png" in out and "last_status:      404" in out
    assert '"n": 1' in out and "00000000  89 50 4e 47" in out

    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "show", "--store", s, "999")
    assert code == 1 and "no dead letter 999" in err
    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s, "--since", "yesterday")
    assert code == 2 and "'yesterday' is not a time" in err
    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "show", "--store", s, "x1")
    assert code == 2 and "'x1' is not a dead letter id" in err
    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", str(tmp_path / "nope.db"))
    assert code == 2 and "no store at" in err and not (tmp_path / "nope.db").exists()
    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store", s)
    assert code == 2 and "say which letters" in err

    # the console entry point in a process of its own, as an operator runs it
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "pipelines.cli", "dlq", "list",
                                                    "--store", s, "--pipeline", "cam"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("3 dead letters"), proc.stderr


async def test_replay_after_fix_delivers_everything_and_purge(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], broken_then_fixed) -> None:
    sink, state = broken_then_fixed
    pf, store, msgs = await fill_store(tmp_path, sink)
    s = str(store)
    assert len(sink.got("/first")) == 3 and len(sink.got("/enrich")) == 3

    state["fixed"] = True
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store", s, "--pipelines", str(pf),
                                           "--pipeline", "cam")
    assert code == 0 and "3 of 3 replayed" in out, out
    # re-run from the failed step: "first" is not called again, "enrich" gets what "first" made
    assert len(sink.got("/first")) == 3
    again = sink.got("/enrich")[3:]
    assert len(again) == 3 and {g.body for g in again} == {b"first:x"}
    assert {g.headers["content-type"] for g in again} == {"application/x-first"}

    async with Store(store) as st:
        ids = [d.id for d in await st.dead_letters(pipeline="log")]
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store", s, "--pipelines", str(pf),
                                           *map(str, ids))
    assert code == 0 and "3 of 3 replayed" in out
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store", s, "--pipelines", str(pf),
                                           str(ids[0]))
    assert code == 1 and "no open dead letters match" in out

    # a router on the same store delivers what was replayed, under the original ids
    async with Router(RouterSettings(pipelines=[pf], store_path=store)) as router:
        async def drained() -> bool:
            b = await router.store.counters()
            return b["deliveries_queued"] == 0 and b["deliveries_delivered"] == 6
        await wait_for(drained, 10, "replayed deliveries")
        books = await router.store.counters()
    assert sorted(g.ce_id for g in sink.got("/log")) == \
        sorted([m.id for m in msgs] * 2)  # 3 refused with 404, then 3 delivered
    assert sorted(g.ce_id for g in sink.got("/out")) == sorted(m.id for m in msgs)
    assert {g.body for g in sink.got("/out")} == {b'{"ok": true}'}
    assert books["dead_letters_open"] == 0 and books["dead_letters_replayed"] == 6
    assert not any(books_gaps(books).values()), books

    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s)
    assert "no dead letters match" in out
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "list", "--store", s, "--all")
    assert out.count("(replayed)") == 6

    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "purge", "--store", s, "--pipeline", "log")
    assert code == 1 and "would purge 3 dead letters" in out
    code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "purge", "--store", s, "--pipeline", "log",
                                           "--yes")
    assert code == 0 and "purged 3 dead letters" in out
    async with Store(store) as st:
        assert len(await st.dead_letters(include_replayed=True)) == 3
        books = await st.counters()
    assert books["dead_letters_purged"] == 0  # they had left the books when replayed
    assert not any(books_gaps(books).values()), books


async def test_a_running_router_delivers_what_the_cli_replays(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], broken_then_fixed) -> None:
    from test_delivery_crash import RouterProcess
    sink, state = broken_then_fixed
    pf = tmp_path / "log.yaml"
    pf.write_text(yaml.safe_dump({"pipelines": {"log": {"steps": [
        {"name": "hook", "destination": {"type": "webhook", "parameters": {"url": sink.url("/log")}}}]}}}))
    router = RouterProcess(tmp_path, pf)
    await router.start()
    try:
        async with httpx.AsyncClient(base_url=router.url) as http:
            r = await http.post("/v1/ingest/demo/cam-9/x", content=b"late", headers={"Message-Id": "m-1"})
            assert r.status_code == 202

            def letters() -> int:
                _, out, _ = cli(capsys, "dlq", "list", "--store", str(tmp_path / "store.db"), "--json")
                return len(out.splitlines())
            await wait_for(lambda: asyncio.to_thread(letters), 10, "the dead letter")
            state["fixed"] = True
            code, out, _ = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store",
                                                   str(tmp_path / "store.db"), "--pipelines", str(pf),
                                                   "--device", "cam-9")
            assert code == 0 and "1 of 1 replayed" in out
            await wait_for(lambda: len(sink.got("/log")) == 2, 10, "the running router to deliver it")
            assert [g.ce_id for g in sink.got("/log")] == ["m-1", "m-1"]
            assert sink.got("/log")[1].body == b"late"
    finally:
        assert await router.terminate() == 0


def test_parse_time_forms() -> None:
    from pipelines.commands.dlq import parse_time
    now = 1_700_000_000.0
    assert parse_time("90s", now) == now - 90
    assert parse_time("2h", now) == now - 7200
    assert parse_time("1700000000", now) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20", now) == 1_700_000_000  # no zone: UTC
    assert abs(parse_time("0s") - time.time()) < 5


async def test_list_and_show_redact_the_secrets_the_pipelines_refer_to(tmp_path: Path) -> None:
    """A fresh ``pipeline dlq`` process knows no secrets until it loads the pipelines (here
    ./pipeline.yaml by default, with --secrets); then nothing it prints shows them."""
    import base64
    import os
    import uuid
    secret = f"tok-{uuid.uuid4().hex}"  # unknown to this process's redactor
    with Sink() as sink:
        sink.answer("/hook", lambda n: Answer(404, body=f"key {secret} rejected".encode()))
        routed = tmp_path / "routed.yaml"
        routed.write_text(yaml.safe_dump({"pipelines": {"log": {"steps": [
            {"name": "hook", "destination": {"type": "webhook", "parameters": {"url": sink.url("/hook")}}}]}}}))
        store = tmp_path / "store.db"
        payload = f"device sent {secret}".encode()
        async with Router(RouterSettings(pipelines=[routed], store_path=store)) as router:
            await router.accept(Message.new(device_id="dev-s", path="/x", content_type="text/plain",
                                            payload=payload, metadata={"api_key": secret}))

            async def one() -> bool:
                return (await router.store.counters())["dead_letters_open"] == 1
            await wait_for(one, 10, "the dead letter")
    # the pipelines as the operator has them: they refer to the secret by name
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"pipelines": {"log": {"steps": [
        {"name": "hook", "destination": {"type": "webhook", "parameters": {
            "url": "http://127.0.0.1:9/hook", "headers": {"Authorization": "Bearer ${TOKEN}"}}}}]}}}))
    (tmp_path / "secrets.env").write_text(f"TOKEN={secret}\n")
    env = {k: v for k, v in os.environ.items() if k.upper() != "TOKEN"}
    env["PYTHONPATH"] = str(ROOT)

    def dlq(*argv: str, extra_env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "dlq", *argv, "--store", str(store)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**env, **(extra_env or {})})
        assert proc.returncode == 0, proc.stderr
        assert secret not in proc.stderr
        return proc.stdout

    # without the secrets the process cannot know them: this is what leaked before
    assert secret in dlq("list", "--json")
    row = json.loads(dlq("list", "--json", "--secrets", "secrets.env"))
    assert secret not in json.dumps(row)
    assert row["metadata"] == {"api_key": "***"} and row["response_excerpt"] == "key *** rejected"
    out = dlq("show", "1", "--secrets", "secrets.env", "--payload", "--payload-out", "exact.bin")
    assert secret not in out
    assert "device sent ***" in out and '"api_key": "***"' in out and "key *** rejected" in out
    assert (tmp_path / "exact.bin").read_bytes() == payload  # --payload-out: the exact bytes
    assert "payload_base64" not in json.loads(dlq("show", "1", "--json", "--secrets", "secrets.env"))
    shown = json.loads(dlq("show", "1", "--json", "--payload", "--secrets", "secrets.env"))
    assert base64.b64decode(shown["payload_base64"]) == b"device sent ***" and shown["payload_redacted"]
    assert secret not in json.dumps(shown)
    # the secret from the environment, the pipelines named explicitly from elsewhere
    os.replace(tmp_path / "pipeline.yaml", tmp_path / "ops.yaml")
    out = dlq("list", "--pipelines", "ops.yaml", extra_env={"TOKEN": secret})
    assert secret not in out and "dev-s" in out
    # pipelines that do not load (or no pipelines at all) do not stop the listing
    (tmp_path / "broken.yaml").write_text("pipelines: [")
    assert "1 dead letter" in dlq("list", "--pipelines", "broken.yaml", "--secrets", "nope.env")


async def test_replay_with_override_sends_the_transformer_call_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], broken_then_fixed) -> None:
    sink, _ = broken_then_fixed  # never fixed: only the local stand-in answers well
    pf, store, _ = await fill_store(tmp_path, sink)
    with Sink() as local:
        local.answer("/enrich", lambda n: Answer(200, {"content-type": "application/json"}, b'{"ok": 1}'))
        code, out, _ = await asyncio.to_thread(
            cli, capsys, "dlq", "replay", "--store", str(store), "--pipelines", str(pf), "--pipeline", "cam",
            "--step", "enrich", "--override", f"{sink.url('')}={local.url('')}")
        assert code == 0 and "3 of 3 replayed" in out, out
        assert len(local.got("/enrich")) == 3 and len(sink.got("/enrich")) == 3  # none went to the old
        assert {g.body for g in local.got("/enrich")} == {b"first:x"}
    code, _, err = await asyncio.to_thread(cli, capsys, "dlq", "replay", "--store", str(store),
                                           "--pipelines", str(pf), "1", "--override", "no-equals-sign")
    assert code == 2 and "--override wants FROM=TO" in err
