"""The one place that POSTs a message over HTTP (webhook destination and webhook transformer).

Usage::

    from pipelines.outbound_http import post_message

    response = await post_message(client, url, message, headers={"Authorization": "..."},
                                  extra=context.extra)
    # 2xx: the httpx.Response; anything else raises DeliveryError

``WebhookParams`` (``url``, ``headers``) is the parameters model both webhook components use.

``make_client()`` builds the client to share for all of this (the router's ``context.http``):
httpx on the asyncio network backend of ``pipelines.http_backend``, about a third less CPU
per POST than stock httpx. Per destination, the URL after overrides (parsed once), the
description errors use, the step's encoded headers and the timeout object are cached, so a
POST only fills in the message's own CloudEvents values.

On that client (an ``OutboundClient``) ``post_message`` sends through aiohttp when nothing of
httpx's client layer would apply to the request (an http(s) URL without credentials, no
auth, no cookies, no event hooks; POSTs follow no redirects): the same request on the wire
(httpx's default headers, ours merged in as ``httpx.Headers.update`` does), the answer
handed back as an ``httpx.Response``, errors mapped to the same ``DeliveryError`` kinds.
Measured on this 2-core box, 54 KB POSTs to a local receiver at 16 in flight: httpx on our
asyncio backend ~380 us of CPU per request, aiohttp ~90 us (``bench/frames_to_webhook.py``:
HTTP was half of an mqtt-worker's CPU). Anything else (and ``client.post`` itself) stays
httpx.

What goes on the wire: the payload bytes as they are; ``Content-Type`` = the message's;
CloudEvents binary-mode headers (``Ce-Specversion: 1.0``, ``Ce-Id`` = message id,
``Ce-Source`` = device id, ``Ce-Subject`` = project id, ``Ce-Type:
io.golioth.data.v1/.s<path>``, ``Ce-Time`` RFC 3339), ``Ce-*`` values percent-encoded as the
CloudEvents HTTP binding asks (non-ASCII paths such as ``/café`` become ``/caf%C3%A9``; plain
ASCII values are unchanged); then the user's headers, which win over ours (compared
case-insensitively).

``extra`` is ``ComponentContext.extra``: ``extra["url_overrides"]`` maps URL bases to others
(``{"https://api.replicate.com": "http://127.0.0.1:5010"}`` sends Replicate calls to the local
stand-in without editing pipelines) and ``extra["timeout"]`` is the per-call timeout in
seconds (default 30). ``extra["request_hooks"]`` (each ``hook(message, url) -> Message | None``;
a message returned replaces the one sent) and ``extra["response_hooks"]`` (each ``await
hook(sent_message, url, response)``, after a 2xx only) let router features see outbound calls;
``url`` is the step's URL before overrides. A failing response hook is logged, not raised:
the receiver already has the message, and raising would make the queue send it again.

Outcomes, as the retry policy (``pipelines.retry``) reads them: ``DeliveryError`` with
``retryable`` True for connection errors, timeouts, 408, 425, 429 and 5xx except 501;
False for other statuses and for a URL that cannot be used. ``retry_after`` comes from the
``Retry-After`` header (seconds or HTTP date); ``response_excerpt`` is the first 500
characters of the answer. Reasons name the scheme and host only, never the URL's path or
query, which may carry a secret.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

import aiohttp
import httpx
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.components import DeliveryError
from pipelines.http_backend import use_asyncio_pool
from pipelines.message import Message
from pipelines.stream_paths import ce_header_value

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
EXCERPT_CHARS = 500
RETRYABLE_STATUSES = frozenset({408, 425, 429})


def is_retryable_status(status: int) -> bool:
    """408, 425, 429 and 5xx except 501 (Not Implemented will not change by retrying)."""
    return status in RETRYABLE_STATUSES or (500 <= status <= 599 and status != 501)


def rfc3339(ts: datetime) -> str:
    if ts.tzinfo is not UTC:  # naive is taken as UTC; another zone is converted
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.isoformat().replace("+00:00", "Z")


def cloudevents_headers(message: Message) -> dict[str, str]:
    """Binary-mode CloudEvents headers plus Content-Type for ``message``."""
    path = message.path if message.path.startswith("/") else "/" + message.path
    return {
        "Content-Type": message.content_type,
        "Ce-Specversion": "1.0",
        "Ce-Id": ce_header_value(message.id),
        "Ce-Source": ce_header_value(message.device_id),
        "Ce-Subject": ce_header_value(message.project_id),
        "Ce-Type": ce_header_value(f"io.golioth.data.v1/.s{path}"),
        "Ce-Time": rfc3339(message.timestamp),
    }


def build_headers(message: Message, user_headers: Mapping[str, str] | None = None) -> httpx.Headers:
    headers = httpx.Headers(cloudevents_headers(message))
    for name, value in (user_headers or {}).items():
        headers[name] = value  # httpx.Headers replaces case-insensitively: the user wins
    return headers


def rewrite_url(url: str, overrides: Mapping[str, str] | None) -> str:
    """Replace the longest matching base in ``overrides``. A base matches only at a boundary:
    ``https://api.replicate.com`` matches ``https://api.replicate.com/v1/x`` but not
    ``https://api.replicate.com.example.org``."""
    for base in sorted(overrides or {}, key=len, reverse=True):
        stem = base.rstrip("/")
        if url == stem or (url.startswith(stem) and url[len(stem)] in "/?#"):
            return overrides[base].rstrip("/") + url[len(stem):]  # type: ignore[index]
    return url


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date; None if absent or
    unreadable. Dates in the past give 0."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None


def describe_target(url: str) -> str:
    """``https://host:port`` only: paths and queries may hold secrets."""
    try:
        parsed = httpx.URL(url)
    except Exception:  # any unparsable URL is described the same way
        return "(unparsable URL)"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def make_client(*, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, limits: httpx.Limits | None = None,
                verify: ssl.SSLContext | str | bool = True) -> httpx.AsyncClient:
    """The outbound client the router should share: ``httpx.AsyncClient`` with the usual
    defaults, on the asyncio network backend (``pipelines.http_backend``), which costs
    about a quarter less CPU per request than httpcore's anyio one. With proxy variables in
    the environment (which a custom transport would ignore), or an httpx whose internals
    differ from what this expects, it is a plain ``httpx.AsyncClient``."""
    limits = limits or httpx.Limits(max_connections=200, max_keepalive_connections=100)
    if not urllib.request.getproxies():
        transport = httpx.AsyncHTTPTransport(limits=limits, verify=verify)
        if use_asyncio_pool(getattr(transport, "_pool", None)):
            return OutboundClient(timeout=timeout, limits=limits, transport=transport, verify=verify)
    return httpx.AsyncClient(timeout=timeout, limits=limits, verify=verify)


# Per-destination work done once, not per POST: the URL after overrides, parsed, with the
# description errors use; the step's own headers, encoded; the timeout object.


@lru_cache(maxsize=1024)
def _resolve(url: str, overrides: tuple[tuple[str, str], ...]) -> tuple[httpx.URL | str, str]:
    rewritten = rewrite_url(url, dict(overrides))
    try:
        parsed: httpx.URL | str = httpx.URL(rewritten)
    except Exception:  # let the client raise its own error for it, as for any bad URL
        parsed = rewritten
    return parsed, describe_target(rewritten)


@lru_cache(maxsize=256)
def _user_header_template(items: tuple[tuple[str, str], ...]) -> dict[bytes, tuple[bytes, bytes]]:
    """lower-case name -> (name, value) encoded as ``httpx.Headers.__setitem__`` does (UTF-8);
    a later name equal but for case replaces an earlier one in its place."""
    template: dict[bytes, tuple[bytes, bytes]] = {}
    for name, value in items:
        raw = name.encode("utf-8")
        template[raw.lower()] = (raw, value.encode("utf-8"))
    return template


@lru_cache(maxsize=64)
def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds)


_CE_NAMES = (b"Content-Type", b"Ce-Specversion", b"Ce-Id", b"Ce-Source", b"Ce-Subject", b"Ce-Type",
             b"Ce-Time")
_CE_LOWER = tuple(n.lower() for n in _CE_NAMES)


_ID, _TIME = object(), object()  # the per-message values in a header plan


@lru_cache(maxsize=4096)
def _header_plan(content_type: str, device_id: str, project_id: str, path: str,
                 user_items: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    """The raw header pairs for messages of one device, path and content type with one set of
    user headers, worked out once: every pair fixed except ``_ID`` and ``_TIME`` (filled per
    message). Ours in order, the user's in place of ours of the same name, then the user's others."""
    path = path if path.startswith("/") else "/" + path
    ours = (content_type.encode("ascii"), b"1.0", _ID, ce_header_value(device_id).encode("ascii"),
            ce_header_value(project_id).encode("ascii"),
            ce_header_value(f"io.golioth.data.v1/.s{path}").encode("ascii"), _TIME)
    user = _user_header_template(user_items) if user_items else {}
    plan: list[Any] = []
    for name, lower, value in zip(_CE_NAMES, _CE_LOWER, ours, strict=True):
        mine = user.get(lower)
        plan.append(mine if mine is not None else (value if value is _ID or value is _TIME else (name, value)))
    plan.extend(pair for lower, pair in user.items() if lower not in _CE_LOWER)
    return tuple(plan)


def _raw_headers(message: Message, user_items: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    """What ``build_headers`` gives, as raw pairs: our headers (ASCII, as ``httpx.Headers``
    encodes a dict) with the user's in place of ours of the same name, then the user's others."""
    plan = _header_plan(message.content_type, message.device_id, message.project_id, message.path, user_items)
    out = list(plan)
    if plan[2] is _ID:
        out[2] = (b"Ce-Id", ce_header_value(message.id).encode("ascii"))
    if plan[6] is _TIME:
        out[6] = (b"Ce-Time", rfc3339(message.timestamp).encode("ascii"))
    return out


def request_headers(message: Message, user_headers: Mapping[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    """The headers ``post_message`` sends for ``message``: what ``build_headers`` gives, as raw
    pairs; all but the message's id and time worked out once per device, path, content type and
    set of user headers (cached)."""
    return _raw_headers(message, tuple(user_headers.items()) if user_headers else ())


class OutboundClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` with a lean path for ``post_message`` (module docstring): an
    aiohttp session, made on first use in the running event loop and closed with the client."""

    def __init__(self, *, verify: ssl.SSLContext | str | bool = True, **kwargs: Any) -> None:
        super().__init__(verify=verify, **kwargs)
        limits = kwargs.get("limits") or httpx.Limits()
        self._lean_limit = limits.max_connections or 0
        self._lean_keepalive = limits.keepalive_expiry
        self._lean_verify = verify
        self._lean: aiohttp.ClientSession | None = None
        self._lean_loop: asyncio.AbstractEventLoop | None = None

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._lean is None or self._lean_loop is not loop or self._lean.closed:
            verify = self._lean_verify
            # the trust httpx would use (certifi unless told otherwise), for https
            context = verify if isinstance(verify, ssl.SSLContext) else (
                httpx.create_ssl_context(verify=verify) if verify else False)
            connector = aiohttp.TCPConnector(limit=self._lean_limit, ssl=context,
                                             keepalive_timeout=self._lean_keepalive or 5.0)
            # no headers, cookies or decompression of aiohttp's own: httpx's are used
            self._lean = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                               cookie_jar=aiohttp.DummyCookieJar(),
                                               skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding",
                                                                  "Content-Type"))
            self._lean_loop = loop
        return self._lean

    async def post_lean(self, url: httpx.URL, content: bytes, raw_headers: list[tuple[bytes, bytes]],
                        timeout: float) -> httpx.Response:
        """``self.post(url, content=..., headers=...)`` through aiohttp (module docstring)."""
        ours = {name.lower() for name, _ in raw_headers}
        # as httpx.Headers.update: a default we also set goes, ours follow the rest
        merged = [pair for pair in self.headers.raw if pair[0].lower() not in ours] + raw_headers
        headers = CIMultiDict((name.decode(), value.decode()) for name, value in merged)
        async with self._session().post(str(url), data=content, headers=headers, allow_redirects=False,
                                        timeout=_lean_timeout(timeout)) as answer:
            body = await answer.read()
            status, raw = answer.status, answer.raw_headers
        response = httpx.Response(status, headers=list(raw), content=body)
        response.read()  # decodes Content-Encoding as httpx would
        return response

    async def _close_lean(self) -> None:
        if self._lean is not None and not self._lean.closed and self._lean_loop is asyncio.get_running_loop():
            await self._lean.close()

    async def aclose(self) -> None:
        await self._close_lean()
        await super().aclose()

    async def __aexit__(self, *exc: Any) -> None:  # httpx's does not go through aclose()
        await self._close_lean()
        await super().__aexit__(*exc)


@lru_cache(maxsize=64)
def _lean_timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _excerpt(response: httpx.Response) -> str:
    return response.content[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]


async def post_message(
    client: httpx.AsyncClient,
    url: str,
    message: Message,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> httpx.Response:
    """POST ``message`` to ``url``. Returns the 2xx response or raises ``DeliveryError``."""
    extra = extra or {}
    # router features may adjust the request (e.g. add the predictions callback) and see the
    # answer (correlation); hooks live in the context, components stay unaware of them
    for hook in extra.get("request_hooks") or ():
        message = hook(message, url) or message
    original_url = url
    overrides = extra.get("url_overrides")
    target_url, target = _resolve(url, tuple(overrides.items()) if overrides else ())
    timeout = float(extra.get("timeout") or DEFAULT_TIMEOUT)
    try:
        raw_headers = request_headers(message, headers)
        if (isinstance(client, OutboundClient) and isinstance(target_url, httpx.URL)
                and target_url.scheme in ("http", "https") and not target_url.userinfo
                and client.auth is None and not client.cookies.jar and not any(client.event_hooks.values())):
            response = await client.post_lean(target_url, message.payload, raw_headers, timeout)
        else:
            response = await client.post(target_url, content=message.payload, headers=raw_headers,
                                         timeout=_timeout(timeout))
    except httpx.TimeoutException as exc:
        raise DeliveryError(f"POST {target}: timed out after {timeout:g} s ({type(exc).__name__})",
                            retryable=True) from None
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise DeliveryError(f"POST {target}: timed out after {timeout:g} s ({type(exc).__name__})",
                            retryable=True) from None
    except aiohttp.ClientConnectorError as exc:
        raise DeliveryError(f"POST {target}: ConnectError: {exc.os_error or exc}", retryable=True) from None
    except aiohttp.InvalidURL as exc:
        raise DeliveryError(f"POST {target}: unusable URL ({exc})", retryable=False) from None
    except aiohttp.ClientError as exc:  # the connection broke, or the answer was not HTTP
        raise DeliveryError(f"POST {target}: {type(exc).__name__}: {str(exc) or 'connection failed'}",
                            retryable=True) from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise DeliveryError(f"POST {target}: unusable URL ({exc})", retryable=False) from None
    except httpx.LocalProtocolError:  # our request is malformed: retrying cannot help
        raise DeliveryError(f"POST {target}: request rejected by the HTTP library "
                            "(check header names and values)",
                            retryable=False) from None
    except httpx.TransportError as exc:
        raise DeliveryError(f"POST {target}: {type(exc).__name__}: {str(exc) or 'connection failed'}",
                            retryable=True) from None
    except httpx.HTTPError as exc:
        raise DeliveryError(f"POST {target}: {type(exc).__name__}: {exc}", retryable=True) from None
    except (ValueError, TypeError) as exc:  # e.g. a header value httpx cannot encode
        raise DeliveryError(f"POST {target}: request could not be built ({type(exc).__name__})",
                            retryable=False) from None
    status = response.status_code
    if 200 <= status <= 299:
        for response_hook in extra.get("response_hooks") or ():
            try:
                await response_hook(message, original_url, response)
            except Exception:  # delivered already: a retry would duplicate it
                log.exception("response hook failed after POST %s of message %s", target, message.id)
        return response
    retryable = is_retryable_status(status)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    phrase = response.reason_phrase or ""
    raise DeliveryError(
        f"POST {target}: HTTP {status} {phrase}".rstrip()
        + ("" if retryable else " (permanent)"),
        retryable=retryable,
        status=status,
        retry_after=retry_after,
        response_excerpt=_excerpt(response),
    )


# ---------------------------------------------------------------------------------------
# Parameters shared by the webhook destination and the webhook transformer


def check_http_url(value: str) -> str:
    """An absolute http(s) URL. The message never repeats the URL: it may be a secret."""
    try:
        url = httpx.URL(value)
    except Exception:  # httpx raises several types for malformed URLs
        raise ValueError("url is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("url must be an absolute http:// or https:// URL")
    return value


class WebhookParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="The endpoint to POST the message to.",
                     examples=["https://api.replicate.com/v1/predictions", "$SLACK_WEBHOOK"])
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="Extra request headers; they win over ours.",
                                    examples=[{"Authorization": "Bearer ${REPLICATE_API_TOKEN}"}])

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_http_url(value)
