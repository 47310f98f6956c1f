"""Turn a file input (data URL or http(s) URL) into bytes, as Replicate does before a model runs.

    data = await fetch_input_file("data:image/png;base64,iVBOR...", client, max_bytes=10_000_000)
    data = await fetch_input_file("http://127.0.0.1:9000/frame.png", client, max_bytes=10_000_000)

Every failure raises ``PredictionFailed`` with a message naming the input, so the prediction ends
``failed`` with a clear ``error`` (never an HTTP error for the caller).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from urllib.parse import unquote_to_bytes

import httpx

from .blip import PredictionFailed


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


async def fetch_input_file(value: str, client: httpx.AsyncClient, max_bytes: int) -> bytes:
    if value[:5].lower() == "data:":
        return decode_data_url(value)
    # Errors name the URL without its query string: presigned URLs carry credentials there.
    shown = value.split("?", 1)[0].split("#", 1)[0]
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    try:
        async with client.stream("GET", value) as response:
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
