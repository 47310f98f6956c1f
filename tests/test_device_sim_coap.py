"""A small aiocoap server standing in for the router's CoAP face, for the simulator's own tests.

The simulator's contract is the wire protocol (devices spec): POST ``/.s/<path>`` answered 2.04
with the message id as payload, and an observable ``/.d/result`` per device. This stand-in keeps
every upload, the Block1 options it saw, and writes a result document for each frame after
``answer_delay`` seconds. The end-to-end test against the real router lives elsewhere.

    async with StandInRouter(port, psks={"cam-01@demo": b"key"}) as router:   # coaps on port
        ...
    router.uploads[0].payload, router.blocks, router.set_result("cam-01", {...})
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiocoap
import aiocoap.resource as resource
from aiocoap import Code, Message


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_dtls_port() -> int:
    """A port P with P-1 free too: aiocoap's tinydtls_server bound to N listens on N+1."""
    for _ in range(50):
        port = free_udp_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", port - 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


@dataclass
class Upload:
    device_id: str
    path: str
    payload: bytes
    content_format: int | None
    message_id: str


class _RecordingSite(resource.Site):
    def __init__(self, router: StandInRouter) -> None:
        super().__init__()
        self._router = router

    async def render_to_pipe(self, pipe):  # sees every block before reassembly
        block1 = pipe.request.opt.block1
        if block1 is not None:
            self._router.blocks.append((block1.block_number, block1.more, block1.size, len(pipe.request.payload)))
        return await super().render_to_pipe(pipe)


class _Stream(resource.Resource):
    def __init__(self, router: StandInRouter, path: str) -> None:
        super().__init__()
        self._router = router
        self._path = path

    async def render_post(self, request):
        router = self._router
        device_id = router.device_of(request)
        router.counter += 1
        message_id = f"msg-{router.counter:04d}"
        router.uploads.append(Upload(device_id, self._path, request.payload, request.opt.content_format,
                                     message_id))
        if router.answer:
            loop = asyncio.get_running_loop()
            loop.call_later(router.answer_delay, router.set_result, device_id, {
                "frame_id": message_id, "output": f"Caption: frame {router.counter} (95%)",
                "status": "succeeded"})
        return Message(code=Code.CHANGED, payload=message_id.encode())


class _State(resource.ObservableResource):
    def __init__(self, router: StandInRouter) -> None:
        super().__init__()
        self._router = router

    async def render_get(self, request):
        document = self._router.results.get(self._router.device_of(request))
        if document is None:
            return Message(payload=b"{}", content_format=50)
        return Message(payload=json.dumps(document).encode(), content_format=50)


class StandInRouter:
    def __init__(self, port: int, *, psks: dict[str, bytes] | None = None, answer: bool = True,
                 answer_delay: float = 0.05) -> None:
        self.port = port
        self.psks = psks  # None: plain coap
        self.answer = answer
        self.answer_delay = answer_delay
        self.uploads: list[Upload] = []
        self.blocks: list[tuple[int, bool, int, int]] = []
        self.results: dict[str, dict] = {}
        self.counter = 0
        self._context: aiocoap.Context | None = None
        self._state: _State | None = None

    def device_of(self, request) -> str:
        if self.psks is not None:
            claims = list(getattr(request.remote, "authenticated_claims", []) or [])
            return claims[0].lstrip(":").split("@")[0] if claims else "?"
        return parse_qs("&".join(request.opt.uri_query)).get("d", ["?"])[0]

    def set_result(self, device_id: str, document: dict) -> None:
        self.results[device_id] = document
        if self._state is not None:
            self._state.updated_state()

    async def start(self) -> StandInRouter:
        site = _RecordingSite(self)
        site.add_resource([".s", "images"], _Stream(self, "/images"))
        self._state = _State(self)
        site.add_resource([".d", "result"], self._state)
        if self.psks is None:
            self._context = await aiocoap.Context.create_server_context(
                site, bind=("127.0.0.1", self.port), transports=["udp6"])
        else:
            # tinydtls_server binds N+1 when asked for N (see the devices spec).
            self._context = await aiocoap.Context.create_server_context(
                site, bind=("127.0.0.1", self.port - 1), transports=["tinydtls_server"])
            self._context.server_credentials.load_from_dict({
                f":{identity}": {"dtls": {"psk": psk, "client-identity": identity.encode()}}
                for identity, psk in self.psks.items()})
        return self

    async def stop(self) -> None:
        context, self._context = self._context, None
        self._state = None
        if context is not None:
            await context.shutdown()

    async def __aenter__(self) -> StandInRouter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---------------------------------------------------------------------------------------- tests
