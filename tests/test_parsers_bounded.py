"""Parsers bounded (issue 14, findings 8-10): YAML aliases, deep JSON, state size, secrets on argv.

Before: a 534-byte registry of YAML aliases made an 802 MB error message (2.4 GB RSS, 15 s); a
live router re-parsed and re-logged a broken registry every 2 s; JSON 600-900 deep became a
RecursionError ("internal error") and a 5.00 on ``/.d``; a device's state document had no cap;
``--webhook-secret`` on the command line was silently visible in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiocoap
import httpx
import pytest
from aiocoap import Code

from pipelines import pipeline_tests
from pipelines.devices import DeviceRegistry, DeviceRegistryError
from pipelines.ingest.coap import CoapIngest, CoapSettings
from pipelines.router import Router, RouterSettings
from pipelines.secrets import SecretsFileError, load_secrets_file
from tests.serve_process import cli, dead_letters_soon, serving

# 9 levels of 9 aliases each: 9**9 (387 million) nodes once expanded, in a few hundred bytes
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def registry_bomb() -> str:
    return BOMB + "project_id: demo\ndevices: *i\n"


def test_a_registry_of_aliases_is_refused_at_once_with_its_location(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text(registry_bomb())
    assert len(path.read_bytes()) < 600
    started = time.monotonic()
    out = cli("devices", "list", "--registry", str(path))
    took = time.monotonic() - started
    print(f"exit {out.returncode} in {took:.2f} s, {len(out.stderr)} bytes of error: {out.stderr.strip()}")
    assert out.returncode != 0 and len(out.stderr) < 1000 and str(path) in out.stderr
    assert "aliases" in out.stderr and "[x, x" not in out.stderr
    with pytest.raises(DeviceRegistryError, match=r"devices.yaml:\d+:\d+: .*YAML aliases"):
        DeviceRegistry.load(path)


def test_a_device_entry_error_does_not_print_the_value(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text("project_id: demo\ndevices:\n  - [" + ", ".join(["secret-ish"] * 5000) + "]\n")
    with pytest.raises(DeviceRegistryError) as err:
        DeviceRegistry.load(path)
    assert "secret-ish" not in str(err.value) and "a list" in str(err.value) and len(str(err.value)) < 300


def test_secrets_and_pipeline_test_files_have_the_same_cap(tmp_path):
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text(BOMB)
    with pytest.raises(SecretsFileError, match="aliases"):
        load_secrets_file(secrets_file)
    tests_file = tmp_path / "tests.yaml"
    tests_file.write_text(BOMB + "tests: *i\npipelines: [p.yaml]\n")
    with pytest.raises(pipeline_tests.TestFileError, match=r"tests.yaml:\d+:\d+: .*aliases"):
        asyncio.run(pipeline_tests.run_test_file(tests_file))


async def test_a_broken_registry_is_reported_once_per_change(tmp_path):
    registry = tmp_path / "devices.yaml"
    registry.write_text('project_id: demo\ndevices:\n  - id: cam-01\n    psk: "k-0123456789"\n')
    registry.chmod(0o600)
    async with serving(tmp_path, "--coap-port", "0", "--registry", str(registry), "--log-level", "INFO") as srv:
        def count(text: str) -> int:
            return srv.stderr().count(text)

        async def until(text: str, n: int) -> None:
            for _ in range(400):
                if count(text) >= n:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"no {n}x {text!r} in\n{srv.stderr()}")

        registry.write_text(registry_bomb())
        await until("device registry not reloaded", 1)
        await asyncio.sleep(5)  # two and a half polls of the file (every 2 s) with no change
        os.utime(registry, (time.time() + 5, time.time() + 5))   # a change: reported again
        await until("device registry not reloaded", 2)
        registry.write_text('project_id: demo\ndevices:\n  - id: cam-02\n    psk: "k-0123456789"\n')
        await until("device registry reloaded", 1)
        assert count("device registry not reloaded") == 2
        assert len(srv.stderr()) < 10_000


@pytest.fixture
async def coap_router(tmp_path):
    registry = tmp_path / "devices.yaml"
    registry.write_text('project_id: demo\ndevices:\n  - id: cam-01\n    psk: "cam-01-secret"\n')
    registry.chmod(0o600)
    (tmp_path / "p.yaml").write_text("pipelines:\n  keep:\n    filter: {path: /temp}\n    steps:\n"
                                     "      - name: keep\n        destination: {type: lightdb-state, version: v1}\n")
    settings = RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db", max_state_bytes=4096)
    async with Router(settings) as router, CoapIngest(router, CoapSettings(
            host="127.0.0.1", port=0, plain_enabled=True, dtls_enabled=False, registry_path=registry,
            rate_limit=0)) as coap:
        ctx = await aiocoap.Context.create_client_context()
        try:
            yield router, coap, ctx
        finally:
            await ctx.shutdown()


async def test_deep_json_gets_a_clear_400_on_coap_state(coap_router):
    _, coap, ctx = coap_router
    for depth in (65, 700, 900):
        body = ("[" * depth + "1" + "]" * depth).encode()
        r = await ctx.request(aiocoap.Message(code=Code.PUT, uri=f"coap://127.0.0.1:{coap.port}/.d/x?d=cam-01",
                                              payload=body, content_format=50)).response
        assert r.code == Code.BAD_REQUEST and b"nested too deeply" in r.payload, (depth, r)
    ok = ("[" * 60 + "1" + "]" * 60).encode()
    r = await ctx.request(aiocoap.Message(code=Code.PUT, uri=f"coap://127.0.0.1:{coap.port}/.d/x?d=cam-01",
                                          payload=ok, content_format=50)).response
    assert r.code == Code.CHANGED


async def test_the_whole_state_document_is_capped(coap_router):
    router, coap, ctx = coap_router
    codes = []
    for i in range(10):  # 10 paths of ~600 bytes each: the 4096-byte cap is reached on the way
        body = json.dumps({"blob": f"{i}" * 600}).encode()
        r = await ctx.request(aiocoap.Message(code=Code.PUT, payload=body, content_format=50,
                                              uri=f"coap://127.0.0.1:{coap.port}/.d/p{i}?d=cam-01")).response
        codes.append(r.code)
        if r.code != Code.CHANGED:
            assert r.code == Code.REQUEST_ENTITY_TOO_LARGE and b"4096-byte cap" in r.payload
    assert codes[0] == Code.CHANGED and codes[-1] == Code.REQUEST_ENTITY_TOO_LARGE
    doc = await router.get_state("demo", "cam-01", "/")
    assert len(json.dumps(doc)) <= 4096 and len(doc) == codes.count(Code.CHANGED)  # refused writes left nothing


async def test_deep_json_through_a_pipeline_is_a_clear_dead_letter(tmp_path):
    async with serving(tmp_path, "--http-ingest") as srv, httpx.AsyncClient(base_url=srv.url) as c:
        body = "[" * 800 + "1" + "]" * 800
        r = await c.post("/v1/ingest/demo/d/temp", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 202
        letters = await dead_letters_soon(c)
    assert "nested too deeply" in letters[0]["error"] and "internal" not in letters[0]["error"]
    assert "RecursionError" not in srv.stderr()


async def test_a_secret_on_the_command_line_is_warned_about_and_a_file_works(tmp_path):
    secret_file = tmp_path / "whsec"
    secret_file.write_text("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    secret_file.chmod(0o600)
    async with serving(tmp_path, "--webhook-secret", "whsec_QkJCQkJCQkJCQkJCQkJCQkJCQkI=") as srv:
        pass
    assert "visible to every user of this machine (ps)" in srv.stderr()
    assert "QkJCQkJC" not in srv.stderr()
    async with serving(tmp_path, "--webhook-secret-file", str(secret_file)) as srv:
        pass
    assert "visible to every user" not in srv.stderr()


def test_store_files_are_private(tmp_path):
    out = cli("keys", "create", "--scope", "read", "--store", str(tmp_path / "new" / "store.db"))
    assert out.returncode == 0
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


async def test_a_running_routers_store_is_private(tmp_path):
    async with serving(tmp_path, "--http-ingest") as srv, httpx.AsyncClient(base_url=srv.url) as c:
        assert (await c.post("/v1/ingest/demo/d/temp", json={"t": 1})).status_code == 202
        folder = srv.store.parent
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert (folder.stat().st_mode & 0o777) == 0o700
        assert {"store.db", "store.db-wal", "store.db-shm"} <= set(modes), modes
        assert all(mode == 0o600 for mode in modes.values()), modes


def test_a_shared_registry_or_secrets_file_is_warned_about(tmp_path, caplog):
    registry = tmp_path / "devices.yaml"
    registry.write_text('project_id: demo\ndevices:\n  - id: cam-01\n    psk: "k-0123456789"\n')
    registry.chmod(0o644)
    secrets_file = tmp_path / "s.env"
    secrets_file.write_text("TOKEN=abcdefgh\n")
    secrets_file.chmod(0o640)
    DeviceRegistry.load(registry)
    load_secrets_file(secrets_file)
    text = caplog.text
    assert f"chmod 600 {registry}" in text and f"chmod 600 {secrets_file}" in text
    assert "k-0123456789" not in text and "abcdefgh" not in text


def test_the_predictions_service_takes_tokens_from_a_file(tmp_path):

    from predictions_service.cli import add_serve_arguments, settings_from_args
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a\n# a comment\ntok-b\n")
    settings = settings_from_args(p.parse_args(["--token-file", str(tokens)]))
    assert settings.tokens == ("tok-a", "tok-b")
    proc = cli("predictions", "serve", "--port", "0", "--token", "tok-on-argv", "--token-file", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "visible to every user" in proc.stderr and "cannot read it" in proc.stderr
