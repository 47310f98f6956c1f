"""Turn a file input (data URL or http(s) URL) into bytes, as Replicate does before a model runs.

    data = await fetch_input_file("data:image/png;base64,iVBOR...", client, max_bytes=10_000_000)
    data = await fetch_input_file("https://example.com/frame.png", client, max_bytes=10_000_000)
    data = await fetch_input_file(url, client, max_bytes, allow_private=True)   # loopback/LAN too

Every failure raises ``PredictionFailed`` with a message naming the input, so the prediction ends
``failed`` with a clear ``error`` (never an HTTP error for the caller).

URLs are fetched only from public addresses unless ``allow_private`` (``--allow-private-urls``):
the host is resolved once, every address it resolves to is checked (loopback, private, link-local,
shared, multicast and reserved ranges are refused: anything not ``is_global``), and the request
goes to the checked address itself (the URL's host is kept in ``Host`` and for TLS in SNI and the
certificate check), so a second DNS answer cannot swap the address between check and fetch.
Redirects (at most 3) are followed by hand and each hop is checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import socket
from urllib.parse import unquote_to_bytes, urljoin

import httpx

from .blip import PredictionFailed

MAX_REDIRECTS = 3


def decode_data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise PredictionFailed("image: malformed data URL (expected data:<type>;base64,<data>)")
    if head.lower().endswith(";base64"):
        with contextlib.suppress(binascii.Error, ValueError):
            # The common case first, in one C pass; what it refuses (whitespace, sloppy padding)
            # gets the tolerant decoding below and its error message.
            return binascii.a2b_base64(payload, strict_mode=True)
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PredictionFailed(f"image: the data URL's base64 is invalid ({exc})") from exc
    return unquote_to_bytes(payload)


def data_url_mime(url: str) -> str:
    head = url[5:url.find(",")] if "," in url[:200] else ""
    return head.split(";", 1)[0] or "application/octet-stream"


def _shown(url: str) -> str:
    """The URL without its query string (presigned URLs carry credentials there), shortened."""
    shown = url.split("?", 1)[0].split("#", 1)[0]
    return shown if len(shown) <= 200 else shown[:200] + "..."


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_checked(url: httpx.URL, allow_private: bool) -> str:
    """The address to connect to for ``url``; PredictionFailed if it is not allowed."""
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PredictionFailed(f"image: could not resolve {host}: {exc}") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise PredictionFailed(f"image: {host} has no address")
    if not allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise PredictionFailed(
                f"image: {host} resolves to a loopback, private or link-local address ({refused[0]}); "
                "the service fetches only public URLs unless started with --allow-private-urls"
            )
    return addresses[0]


async def fetch_input_file(value: str, client: httpx.AsyncClient, max_bytes: int,
                           allow_private: bool = False) -> bytes:
    if value[:5].lower() == "data:":
        return decode_data_url(value)
    url = value
    for _hop in range(MAX_REDIRECTS + 1):
        shown = _shown(url)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise PredictionFailed(f"image: {shown} is not a valid URL ({exc})") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise PredictionFailed(f"image: {shown} is not an http(s) URL")
        address = await resolve_checked(parsed, allow_private)
        pinned = parsed.copy_with(host=address)
        host_header = parsed.netloc.decode("ascii").rpartition("@")[2]
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        try:
            async with client.stream("GET", pinned, headers={"host": host_header}, extensions=extensions,
                                     follow_redirects=False) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise PredictionFailed(f"image: fetching {shown} answered HTTP {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PredictionFailed(f"image: {shown} is larger than {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise PredictionFailed(f"image: could not fetch {shown}: {type(exc).__name__}: {exc}") from exc
    raise PredictionFailed(f"image: fetching {_shown(value)} was redirected more than {MAX_REDIRECTS} times")
