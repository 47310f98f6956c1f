"""TLS for the HTTP face, so keys never cross the network in clear: a real ``pipeline serve``."""

from __future__ import annotations

import ssl

import httpx
import pytest

from pipelines.http_tls import self_signed
from tests.serve_process import cli, serving


async def test_self_signed_certificate_made_once_and_kept(tmp_path):
    key = cli("keys", "create", "--scope", "read", "--store", str(tmp_path / "data" / "store.db")).stdout.strip()
    async with serving(tmp_path, "--http-tls", "self-signed", "--http-host", "0.0.0.0") as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        cert = tmp_path / "data" / "http-cert.pem"
        assert (tmp_path / "data" / "http-key.pem").stat().st_mode & 0o777 == 0o600
        first = cert.read_bytes()
        async with httpx.AsyncClient(base_url=srv.url, verify=ssl.create_default_context(cafile=str(cert))) as c:
            assert (await c.get("/v1/stream")).status_code == 401
            assert (await c.get("/v1/stream", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        # plain HTTP to the TLS port gets nothing useful, and no key is read in clear
        async with httpx.AsyncClient(base_url=srv.url.replace("https", "http")) as c:
            try:
                served = (await c.get("/v1/stream", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            except httpx.HTTPError:
                served = False
            assert not served
        # an unknown certificate is refused by a verifying client
        async with httpx.AsyncClient(base_url=srv.url) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/healthz")
    async with serving(tmp_path, "--http-tls", "self-signed") as srv:
        assert cert.read_bytes() == first  # the same certificate on the next start


async def test_a_given_certificate_and_key(tmp_path):
    certfile, keyfile = self_signed(tmp_path / "mine" / "x.db", "127.0.0.1")
    verify = ssl.create_default_context(cafile=certfile)
    async with serving(tmp_path, "--http-cert", certfile, "--http-key", keyfile) as srv, \
            httpx.AsyncClient(base_url=srv.url, verify=verify) as c:
        assert (await c.get("/healthz")).status_code == 200
    out = cli("serve", "--http-cert", certfile, "--http-port", "0", "--store", str(tmp_path / "s.db"))
    assert out.returncode == 2 and "--http-cert and --http-key go together" in out.stderr
