"""One camera's CoAP (or CoAPS, DTLS-PSK) connection to the router: upload, observe, ping.

Each link owns its own aiocoap client Context, so each camera has its own UDP endpoint and its
own DTLS session, like a real device. Use::

    link = CoapLink(identity, host="127.0.0.1", port=5684)          # coaps, PSK identity
    await link.open()
    frame_id = await link.upload("images", png_bytes, content_format=23)   # Block1, 1024 B
    request = link.observe("result")      # aiocoap request with Observe; iterate .observation
    alive = await link.ping()              # empty CON, answered by RST
    await link.reset()                     # new endpoint and new DTLS session after a failure
    await link.close()

With ``secure=False`` the link speaks plain ``coap://`` and names itself with ``?d=<device-id>``.
Failures are raised as :class:`LinkError` (timeouts, unreachable router, error responses as
:class:`RejectedError` with the CoAP code and Max-Age); the key never appears in messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiocoap
from aiocoap import Code, Message
from aiocoap.numbers.codes import EMPTY
from aiocoap.optiontypes import BlockOption

from device_sim.dtls_transport import dtls_client_context
from device_sim.identity import DeviceIdentity

log = logging.getLogger(__name__)

# aiocoap only honours a per-request block size for plain UDP remotes; for DTLS the documented
# fallback is an initial Block1 option, which it flags as deprecated. Both are expected here.
warnings.filterwarnings("ignore", message="Setting a block1 option in a managed block-wise",
                        category=DeprecationWarning)

BLOCK_SIZES = {16: 0, 32: 1, 64: 2, 128: 3, 256: 4, 512: 5, 1024: 6}
# The router's limits (pipelines.devices): refused up front with a clear message.
MAX_PSK_IDENTITY = 256
MAX_PSK_KEY = 64


class LinkError(Exception):
    """An exchange with the router failed: no answer in time, unreachable, or refused."""


class RejectedError(LinkError):
    """The router answered with an error code (``code``, e.g. ``"5.03"``)."""

    def __init__(self, code: Code, max_age: int | None, detail: str = "") -> None:
        self.code = code
        self.max_age = max_age
        text = f"router answered {code.dotted} {code.name_printable}"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def retryable(self) -> bool:
        # 4.08: the router lost the transfer; 4.29/5.xx: try again later. Other 4.xx will not
        # change by resending the same bytes.
        return self.code.class_ == 5 or self.code in (
            Code.REQUEST_ENTITY_INCOMPLETE, Code.TOO_MANY_REQUESTS)


class CoapLink:
    """A device's CoAP client endpoint towards one router."""

    def __init__(
        self,
        identity: DeviceIdentity,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        secure: bool = True,
        block_size: int = 1024,
        request_timeout: float = 30.0,
    ) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} not allowed: use one of {sorted(BLOCK_SIZES)}")
        if request_timeout <= 0:
            raise ValueError(f"request timeout must be > 0, got {request_timeout}")
        if secure and len(identity.psk_identity) > MAX_PSK_IDENTITY:
            size = len(identity.psk_identity)
            raise ValueError(f"PSK identity {identity.psk_identity.decode()!r} is {size} bytes; "
                             f"DTLS accepts at most {MAX_PSK_IDENTITY}")
        if secure and len(identity.psk_bytes) > MAX_PSK_KEY:
            raise ValueError(f"device {identity.device_id}: pre-shared key is {len(identity.psk_bytes)} "
                             f"bytes; DTLS accepts at most {MAX_PSK_KEY}")
        self.identity = identity
        self.secure = secure
        self.scheme = "coaps" if secure else "coap"
        self.port = port or (5684 if secure else 5683)
        self.host = host
        hostinfo = f"[{host}]" if ":" in host else host
        self.base_uri = f"{self.scheme}://{hostinfo}:{self.port}"
        self.block_size = block_size
        self.request_timeout = request_timeout
        self.last_activity = time.monotonic()
        self.correlates = True  # the 2.04 names the frame, so answers match by frame_id
        self._context: aiocoap.Context | None = None

    @property
    def is_open(self) -> bool:
        return self._context is not None

    async def open(self) -> None:
        if self._context is not None:
            return
        try:
            if self.secure:  # TLS_PSK_WITH_AES_128_GCM_SHA256, as Zephyr's mbedTLS offers
                context = await dtls_client_context(self.identity.psk_identity, self.identity.psk_bytes)
            else:
                context = await aiocoap.Context.create_client_context(transports=["udp6"])
        except OSError as exc:
            raise LinkError(f"cannot open a {self.scheme} endpoint: {exc}") from None
        # Devices on the Golioth SDK send 8-byte tokens; aiocoap counts up from a 2-byte random
        # start and strips leading zeros, so start it high in the 64-bit range instead.
        for interface in context.request_interfaces:
            if isinstance(getattr(interface, "_token", None), int):
                interface._token = random.getrandbits(63) | (1 << 63)
        self._context = context

    async def close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.shutdown(), 5)

    async def reset(self) -> None:
        """Drop the endpoint (and DTLS session) and start afresh, as a device does after errors."""
        await self.close()
        await self.open()

    def uri(self, path: str) -> str:
        uri = f"{self.base_uri}/{path.lstrip('/')}"
        if not self.secure:
            uri += f"?d={quote(self.identity.device_id, safe='')}"
        return uri

    async def upload(self, path: str, payload: bytes, content_format: int) -> str:
        """POST ``payload`` to ``/.s/<path>``; return the router's message id (the 2.04 payload)."""
        message = Message(code=Code.POST, uri=self.uri(f".s/{path.lstrip('/')}"), payload=payload,
                          content_format=content_format)
        szx = BLOCK_SIZES[self.block_size]
        if szx < 6:
            if self.secure:
                message.opt.block1 = BlockOption.BlockwiseTuple(0, False, szx)
            else:
                message.remote.maximum_block_size_exp = szx
        response = await self._exchange(message)
        if not response.code.is_successful():
            raise RejectedError(response.code, response.opt.max_age,
                                _printable(response.payload))
        return response.payload.decode("ascii", "replace").strip()

    def observe(self, path: str) -> aiocoap.protocol.Request:
        """Start observing ``/.d/<path>``; the caller awaits ``.response`` and iterates ``.observation``."""
        context = self._require_context()
        self.last_activity = time.monotonic()
        request = context.request(Message(code=Code.GET, uri=self.uri(f".d/{path.lstrip('/')}"), observe=0))
        request.response.add_done_callback(_consume)
        return request

    async def subscribe(self, path: str) -> CoapSubscription:
        """Observe ``/.d/<path>``; raises :class:`LinkError` unless the observation is established."""
        request = self.observe(path)
        try:
            response = await asyncio.wait_for(asyncio.shield(request.response), self.request_timeout)
        except TimeoutError:
            raise LinkError(f"no answer to observe from {self.base_uri} within {self.request_timeout:g} s"
                            ) from None
        except (aiocoap.error.Error, OSError) as exc:
            raise LinkError(f"observe at {self.base_uri} failed: {exc}") from None
        if not response.code.is_successful() or response.opt.observe is None:
            with contextlib.suppress(Exception):
                request.observation.cancel()
            raise LinkError(f"observe at {self.base_uri}/.d/{path.lstrip('/')} not established: "
                            f"{response.code.dotted} {response.code.name_printable}")
        return CoapSubscription(request, response)

    async def ping(self, timeout: float = 5.0) -> bool:
        """Send an empty CON (CoAP ping) and wait for the RST; False if none came in time.

        aiocoap has no public ping for UDP, so this hands the empty message to the context's
        message manager (the layer that does CON retransmission) directly.
        """
        context = self._require_context()
        probe = Message(code=Code.GET, uri=self.uri(""))
        for interface in context.request_interfaces:
            manager = getattr(interface, "token_interface", None)
            if manager is None or not hasattr(manager, "send_message"):
                continue
            with contextlib.suppress(Exception):
                if await manager.fill_or_recognize_remote(probe):
                    break
        else:
            return False
        ping = Message(code=EMPTY, transport_tuning=aiocoap.Reliable)
        ping.remote = probe.remote
        answered = asyncio.get_running_loop().create_future()
        try:
            manager.send_message(ping, lambda: answered.done() or answered.set_result(True))
        except Exception as exc:  # unreachable router, shut-down transport
            log.debug("%s: ping not sent: %s", self.identity.device_id, exc)
            return False
        self.last_activity = time.monotonic()
        # Only an RST answers a ping (RFC 7252 §4.3); an ICMP error merely ends the exchange.
        try:
            await asyncio.wait_for(answered, timeout)
        except TimeoutError:
            return False
        return True

    async def _exchange(self, message: Message) -> Message:
        context = self._require_context()
        self.last_activity = time.monotonic()
        request = context.request(message)
        request.response.add_done_callback(_consume)
        try:
            response = await asyncio.wait_for(asyncio.shield(request.response), self.request_timeout)
        except TimeoutError:
            raise LinkError(f"no answer from {self.base_uri} within {self.request_timeout:g} s") from None
        except aiocoap.error.Error as exc:
            raise LinkError(f"exchange with {self.base_uri} failed: {exc}") from None
        except OSError as exc:
            raise LinkError(f"cannot reach {self.base_uri}: {exc}") from None
        self.last_activity = time.monotonic()
        return response

    def _require_context(self) -> aiocoap.Context:
        if self._context is None:
            raise LinkError("link is closed")
        return self._context


@dataclass(frozen=True)
class Notification:
    """One state document received from the router (CoAP notification or MQTT message)."""

    payload: bytes
    content_format: int | None  # CoAP Content-Format number, None if not given


class CoapSubscription:
    """An established observation: iterate it for notifications (the current state first)."""

    def __init__(self, request: aiocoap.protocol.Request, first: Message) -> None:
        self._request = request
        self._first = first

    async def __aiter__(self) -> AsyncIterator[Notification]:
        yield _notification(self._first)
        try:
            async for message in self._request.observation:
                yield _notification(message)
        except (aiocoap.error.Error, OSError) as exc:
            log.debug("observation ended: %s", exc)

    def cancel(self) -> None:
        with contextlib.suppress(Exception):
            self._request.observation.cancel()


def _notification(message: Message) -> Notification:
    if not message.code.is_successful():
        return Notification(b"", None)
    cf = message.opt.content_format
    return Notification(message.payload, None if cf is None else int(cf))


def _printable(payload: bytes, limit: int = 200) -> str:
    text = payload[:limit].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _consume(future: asyncio.Future) -> None:
    # A response we stopped waiting for (timeout, reset) must not log "never retrieved".
    if not future.cancelled():
        future.exception()
