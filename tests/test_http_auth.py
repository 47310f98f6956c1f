"""The HTTP face behind API keys (issue 14, finding 1): a real ``pipeline serve``, real httpx.

``pipeline keys`` makes, lists and revokes keys (stored hashed); once one exists every reading
and operating endpoint wants ``Authorization: Bearer KEY``; a non-loopback address without
keys refuses to start; wrong keys are rate-limited per client.
"""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import pytest

from tests.serve_process import cli, serve_command, serving


def make_key(tmp, scope: str, name: str = "") -> tuple[str, str]:
    out = cli("keys", "create", "--scope", scope, "--name", name, "--store", str(tmp / "data" / "store.db"))
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("iotp_") and "shown only now" in out.stderr
    return key.split("_")[1], key


async def test_keys_are_stored_hashed_and_listed_without_the_key(tmp_path):
    key_id, key = make_key(tmp_path, "read", "grafana")
    db = (tmp_path / "data" / "store.db").read_bytes()
    assert key.encode() not in db and key.split("_", 2)[2].encode() not in db
    listed = cli("keys", "list", "--store", str(tmp_path / "data" / "store.db"))
    assert key_id in listed.stdout and "grafana" in listed.stdout and key not in listed.stdout
    assert cli("keys", "revoke", key_id, "--store", str(tmp_path / "data" / "store.db")).returncode == 0
    assert key_id not in cli("keys", "list", "--store", str(tmp_path / "data" / "store.db")).stdout
    assert cli("keys", "revoke", key_id, "--store", str(tmp_path / "data" / "store.db")).returncode == 1


async def test_with_keys_the_face_wants_one_and_scopes_hold(tmp_path):
    _, read_key = make_key(tmp_path, "read")
    admin_id, admin_key = make_key(tmp_path, "admin")
    async with serving(tmp_path, "--http-ingest") as srv, httpx.AsyncClient(base_url=srv.url) as c:
        for path in ("/v1/devices/demo/cam-01/state", "/v1/stream", "/v1/dead-letters", "/v1/unmatched"):
            r = await c.get(path)
            assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"], path
            assert (await c.get(path, headers={"Authorization": f"Bearer {read_key}"})).status_code == 200
        assert (await c.get("/healthz")).status_code == 200  # open unless --protect-metrics
        assert (await c.get("/metrics")).status_code == 200
        post = "/v1/ingest/demo/dev-1/temp"
        r = await c.post(post, json={"t": 1}, headers={"Authorization": f"Bearer {read_key}"})
        assert r.status_code == 403 and "admin" in r.json()["detail"]
        assert (await c.post(post, json={"t": 1})).status_code == 401
        r = await c.post(post, json={"t": 1}, headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 202
        # a key with one character changed is refused
        wrong = admin_key[:-1] + ("A" if admin_key[-1] != "A" else "B")
        assert (await c.get("/v1/stream", headers={"Authorization": f"Bearer {wrong}"})).status_code == 401
        # revoked: refused within a second or so on the running router
        assert cli("keys", "revoke", admin_id, "--store", str(srv.store)).returncode == 0
        for _ in range(100):
            r = await c.get("/v1/stream", headers={"Authorization": f"Bearer {admin_key}"})
            if r.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 401


async def test_protect_metrics_puts_health_behind_a_key(tmp_path):
    _, key = make_key(tmp_path, "read")
    async with serving(tmp_path, "--protect-metrics") as srv, httpx.AsyncClient(base_url=srv.url) as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await c.get(path)).status_code == 401
            assert (await c.get(path, headers={"Authorization": f"Bearer {key}"})).status_code == 200


async def test_every_interface_without_keys_refuses_to_start_and_says_what_to_run(tmp_path):
    proc = await asyncio.create_subprocess_exec(*serve_command(tmp_path, "--http-host", "0.0.0.0"),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and not out.startswith(b"ready")
    assert b"without authentication" in err and b"pipeline keys create --scope admin" in err


async def test_every_interface_with_a_key_answers_401_without_it_and_200_with_it(tmp_path):
    _, key = make_key(tmp_path, "read")
    async with serving(tmp_path, "--http-host", "0.0.0.0") as srv:
        port = srv.url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/v1/unmatched")).status_code == 401
            assert (await c.get("/v1/unmatched", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            # off loopback, metrics need the key too; /healthz (just "ok") does not
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/metrics", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            assert (await c.get("/healthz")).status_code == 200


async def test_loopback_without_keys_stays_open_and_says_so_once(tmp_path):
    async with serving(tmp_path, "--log-level", "INFO") as srv, httpx.AsyncClient(base_url=srv.url) as c:
        for _ in range(3):
            assert (await c.get("/v1/stream")).status_code == 200
    assert srv.stderr().count("is open (no API keys)") == 1


async def test_wrong_keys_are_rate_limited_per_client(tmp_path):
    _, key = make_key(tmp_path, "read")
    async with serving(tmp_path) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        codes = [(await c.get("/v1/stream", headers={"Authorization": f"Bearer iotp_00000000_guess{i}"}))
                 for i in range(12)]
        assert [r.status_code for r in codes[:10]] == [401] * 10
        assert codes[10].status_code == 429 and 1 <= int(codes[10].headers["retry-after"]) <= 60
        # while blocked, even the right key waits: guessing gets no answers at all
        assert (await c.get("/v1/stream", headers={"Authorization": f"Bearer {key}"})).status_code == 429
        assert (await c.get("/healthz")).status_code == 200


def test_store_keeps_only_hashes(tmp_path):
    _, key = make_key(tmp_path, "admin")
    rows = sqlite3.connect(tmp_path / "data" / "store.db").execute("SELECT hash, scope FROM api_keys").fetchall()
    assert len(rows) == 1 and rows[0][1] == "admin" and len(rows[0][0]) == 64 and key not in rows[0][0]


def test_an_unreadable_key_table_never_means_open(tmp_path):
    from pipelines.http_auth import Authenticator
    store = tmp_path / "store.db"
    store.write_bytes(b"this is not an SQLite database, and certainly not one without keys" * 100)
    auth = Authenticator(store, host="127.0.0.1")
    for _ in range(2):  # and not on the next request either
        with pytest.raises(sqlite3.DatabaseError):
            auth.authenticate(None)
