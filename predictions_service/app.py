"""The HTTP face of the local predictions service: Replicate's ``/v1`` contract on starlette.

    app = create_app(Settings(tokens=("r8_local",)))          # any ASGI server can run it
    await serve(Settings(tokens=("r8_local",), port=8008))     # uvicorn, until cancelled
    async with running(Settings(tokens=("t",), port=0)) as url: ...   # in-process, free port

Endpoints (all need ``Authorization: Bearer <token>`` or ``Token <token>``):
``POST /v1/predictions``, ``POST /v1/models/{o}/{n}/predictions``,
``POST /v1/deployments/{o}/{n}/predictions``, ``GET /v1/predictions[?cursor=]``,
``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``,
``GET /v1/predictions/{id}/stream`` (``urls.stream``, server-sent events, with ``stream: true``),
``GET /v1/models/{o}/{n}`` (with ``latest_version``), ``GET /v1/models/{o}/{n}/versions[/{id}]``,
the Files API (``files_api.py``), ``GET /v1/webhooks/default/secret``; plus ``GET /p/{id}``
(the ``urls.web`` page, same JSON) and an unauthenticated ``GET /healthz``.

Webhook options: ``webhook`` with ``webhook_events_filter`` (a filter without a webhook is a 422),
and the legacy ``webhook_completed`` (its own URL, told of completion only). Bodies are counted as
they stream (``body.py``); data-URL inputs over ``spill_input_bytes`` go to the file store and the
input then names the file's URL; held inputs are capped (``records.PredictionStore``).

The one model is ``salesforce/blip`` at version ``2e1dddc8…4746`` (see ``blip.py`` for what really
answers). Any deployment name is served by that model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.util
import json
import logging
import random
import re
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import blip
from .blip import PredictionFailed
from .body import read_capped
from .files import FileStore, FileTooLarge, StorageFull
from .files_api import files_routes
from .image_input import data_url_mime, decode_data_url
from .problems import NOT_FOUND, ApiProblem, InputInvalid, invalid_version
from .ratelimit import RateLimiter
from .records import ALL_EVENTS, BadCursor, InputsFull, Prediction
from .runner import PredictionRunner
from .settings import Settings

log = logging.getLogger("predictions_service")

HEX64 = re.compile(r"^[0-9a-f]{64}$")
OWNER_NAME = re.compile(r"^([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)$")
PREFER_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$")
CANCEL_AFTER = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")
MAX_WAIT = 60


def _json(data: object, status: int = 200, headers: dict | None = None) -> Response:
    text = data if isinstance(data, str) else json.dumps(data)  # a str is JSON text already
    return Response(text, status_code=status, media_type="application/json", headers=headers)


def parse_prefer_wait(header: str | None) -> int | None:
    """Seconds to hold the request, or None when there is no valid ``wait`` preference (RFC 7240: ignore)."""
    if not header:
        return None
    for part in header.split(","):
        m = PREFER_WAIT.match(part)
        if m:
            if m.group(1) is None:
                return MAX_WAIT
            n = int(m.group(1))
            return n if 1 <= n <= MAX_WAIT else None
    return None


def parse_cancel_after(header: str) -> float:
    """``30s``, ``5m``, ``1h30m45s`` or a bare number of seconds; 5 s to 24 h, else 422."""
    text = header.strip()
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    elif text and (m := CANCEL_AFTER.fullmatch(text)):
        h, mi, s = m.groups()
        seconds = int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)
    if seconds is None:
        raise InputInvalid(
            [
                (
                    "Cancel-After",
                    "format",
                    f"Cancel-After {text[:40]!r} is not a duration like 30s, 5m or 1h30m",
                )
            ]
        )
    if not 5 <= seconds <= 86400:
        raise InputInvalid([("Cancel-After", "range", "Cancel-After must be between 5s and 24h")])
    return seconds


class Service:
    """Request handling; one instance per app, holding the runner and the limits."""

    def __init__(self, settings: Settings, runner: PredictionRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.create_limits = RateLimiter(settings.create_rate_per_minute)
        self.other_limits = RateLimiter(settings.other_rate_per_minute)
        self.rng = random.Random(settings.fault_seed)
        self._tokens = [t.encode() for t in settings.tokens]
        self._base_urls: dict[tuple, str] = {}
        self._owners: dict[str, str] = {}  # API token -> the digest files and predictions are owned by
        self._creating = 0  # create requests in progress (read, validated or waiting for their prediction)

    # -- guards ---------------------------------------------------------------------------------
    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() not in ("bearer", "token") or not token:
            if self.settings.allow_anonymous:
                return "anonymous"
            raise ApiProblem(401, "You did not pass an authentication token", title="Unauthenticated")
        # Compare against every token so the time taken says nothing about which one nearly matched.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, token.encode())
        if not matched and not self.settings.allow_anonymous:
            raise ApiProblem(401, "You did not pass a valid authentication token", title="Unauthenticated")
        return token if matched else "anonymous"

    async def guard(self, request: Request, creates: bool) -> dict[str, str]:
        """Auth, rate limit and injected faults; returns the ratelimit headers for the answer."""
        identity = self._authenticate(request)
        owner = self._owners.get(identity)
        if owner is None:
            owner = hashlib.sha256(identity.encode()).hexdigest()[:24]
            if len(self._owners) < 1024:
                self._owners[identity] = owner
        request.state.owner = owner
        decision = (self.create_limits if creates else self.other_limits).take(identity)
        headers = {
            "ratelimit-remaining": str(decision.remaining),
            "ratelimit-reset": str(decision.reset_seconds),
        }
        request.state.ratelimit_headers = headers  # errors raised later carry them too
        if not decision.allowed:
            raise ApiProblem(
                429,
                f"Request was throttled. Your rate limit resets in ~{decision.reset_seconds}s.",
                headers={**headers, "retry-after": str(decision.reset_seconds)},
            )
        if self.settings.fault_rate and self.rng.random() < self.settings.fault_rate:
            kind = self.rng.choice(self.settings.fault_kinds)
            if kind == "slow":
                await asyncio.sleep(self.settings.fault_slow_seconds)
            elif kind == "429":
                raise ApiProblem(
                    429,
                    "Request was throttled. Your rate limit resets in ~1s. (injected fault)",
                    headers={**headers, "retry-after": "1"},
                )
            else:
                raise ApiProblem(int(kind), "injected fault", title="Server error", headers=headers)
        return headers

    def base_url(self, request: Request) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        # Building request.url parses the whole URL; scheme, Host and server alone decide the base.
        scope = request.scope
        key = (scope.get("scheme"), request.headers.get("host"), scope.get("server"))
        base = self._base_urls.get(key)
        if base is None:
            base = f"{request.url.scheme}://{request.url.netloc}"
            if len(self._base_urls) < 64:  # Host is the client's to choose: keep the cache small
                self._base_urls[key] = base
        return base

    async def _body(self, request: Request) -> tuple[dict, bool]:
        """The JSON object sent, and whether it was ASCII without a backslash (so none of its
        strings needs escaping when it is echoed back: see ``Prediction.input_plain``)."""
        raw = b"".join([chunk async for chunk in read_capped(request, self.settings.max_body_bytes)])
        try:
            body = json.loads(raw) if raw and not raw.isspace() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiProblem(400, f"The request body is not valid JSON: {exc}", title="Bad Request") from exc
        except RecursionError as exc:
            raise ApiProblem(400, "The request body is nested too deeply", title="Bad Request") from exc
        if not isinstance(body, dict):
            raise InputInvalid([("(root)", "invalid_type", "Invalid type. Expected: object")])
        # json.loads refuses raw control characters in strings, so an ASCII body without a backslash
        # decodes to strings that json.dumps would write back unchanged, between quotes.
        return body, raw.isascii() and b"\\" not in raw

    # -- creating -------------------------------------------------------------------------------
    def _resolve_version(self, version: str) -> tuple[str, str]:
        """(model, version) for a version field, or the 422 "Invalid version or not permitted"."""
        if HEX64.match(version):
            if version == blip.VERSION:
                return blip.MODEL, version
            raise invalid_version()
        if ":" in version:
            model, _, vid = version.partition(":")
            if model == blip.MODEL and vid == blip.VERSION:
                return model, vid
            raise invalid_version()
        if version == blip.MODEL:
            return blip.MODEL, blip.VERSION
        raise invalid_version()

    def _validate(self, body: dict, with_version: bool) -> list[tuple[str, str, str]]:
        allowed = {"input", "webhook", "webhook_events_filter", "stream", "webhook_completed"}
        if with_version:
            allowed.add("version")
        problems: list[tuple[str, str, str]] = []
        if with_version:
            if "version" not in body:
                problems.append(("(root)", "required", "version is required"))
            elif not isinstance(body["version"], str):
                problems.append(("version", "invalid_type", "Invalid type. Expected: string"))
        for key in body:
            if key not in allowed:
                problems.append(
                    ("(root)", "additional_property_not_allowed", f"Additional property {key} is not allowed")
                )
        if "input" not in body:
            problems.append(("(root)", "required", "input is required"))
        else:
            problems.extend(blip.validate_input(body["input"]))
        for key in ("webhook", "webhook_completed"):
            hook = body.get(key)
            if hook is not None and (not isinstance(hook, str) or not re.match(r"^https?://[^\s/]+", hook)):
                problems.append((key, "format", "Does not match format 'uri' (an http(s) URL)"))
        events = body.get("webhook_events_filter")
        if events is not None and (not isinstance(events, list) or any(e not in ALL_EVENTS for e in events)):
            choices = ", ".join(f'"{e}"' for e in ALL_EVENTS)
            problems.append(
                ("webhook_events_filter", "enum", f"webhook_events_filter must be an array of: {choices}")
            )
        elif events is not None and body.get("webhook") is None:
            # it filters what goes to `webhook`; without one it would be accepted and do nothing
            problems.append(
                ("webhook_events_filter", "dependency", "webhook_events_filter needs a webhook to filter")
            )
        if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
            problems.append(("stream", "invalid_type", "Invalid type. Expected: boolean"))
        return problems

    async def create(self, request: Request, route_model: str | None, deployment: bool = False) -> Response:
        self._creating += 1
        try:
            return await self._create(request, route_model, deployment)
        finally:
            self._creating -= 1

    async def _create(self, request: Request, route_model: str | None, deployment: bool) -> Response:
        headers = await self.guard(request, creates=True)
        if route_model is not None and not deployment and route_model != blip.MODEL:
            raise ApiProblem(404, NOT_FOUND, headers=headers)
        body, plain = await self._body(request)
        problems = self._validate(body, with_version=route_model is None)
        if problems:
            raise InputInvalid(problems)
        if route_model is None:
            model, version = self._resolve_version(body["version"])
        else:
            model, version = blip.MODEL, blip.VERSION
        deadline = None
        if (cancel_after := request.headers.get("cancel-after")) is not None:
            deadline = parse_cancel_after(cancel_after)
        wait = parse_prefer_wait(request.headers.get("prefer"))
        events = body.get("webhook_events_filter")
        base_url = self.base_url(request)
        inp = body["input"]
        if any(type(v) is str and len(v) > self.settings.spill_input_bytes for v in inp.values()):
            inp = await self._spill(inp, request.state.owner, base_url)
        pred = Prediction(
            model=model,
            version=version,
            input=inp,
            base_url=base_url,
            webhook=body.get("webhook"),
            events=frozenset(events if events is not None else ALL_EVENTS),
            webhook_completed=body.get("webhook_completed"),
            owner=request.state.owner,
            input_plain=plain,
        )
        if body.get("stream"):
            pred.sse = []
        if deadline is not None:
            pred.deadline = pred.created_at + deadline
        # Its creator waits for it and nothing else watches it: it may run on the loop's thread
        # when it is the service's only prediction (runner.py says when and why).
        pred.inline = (self.settings.inline_runs and wait is not None and self._creating == 1
                       and pred.sse is None and pred.webhook is None
                       and pred.webhook_completed is None and pred.deadline is None)
        try:
            self.runner.submit(pred)
        except InputsFull as exc:
            raise ApiProblem(503, str(exc), title="Service Unavailable",
                             headers={**headers, "retry-after": "1"}) from exc
        headers["location"] = pred.url
        if wait is not None:
            headers["preference-applied"] = f"wait={wait}"
            status = None
            if not await self.runner.wait(pred, wait):
                status = "starting"  # the official client 1.0.7 treats anything else as final
            return _json(pred.to_json(status=status), 201, headers)
        # Answer with the prediction as created, but let its run reach the model thread first: the
        # answer (which echoes the input, ~56 KB for a frame) is then encoded and sent meanwhile.
        snapshot = pred.as_json()
        await asyncio.sleep(0)
        return _json(pred.encode(snapshot), 201, headers)

    async def _spill(self, inp: dict, owner: str, base_url: str) -> dict:
        """Move big data-URL inputs to the file store; the input then names the file's URL, as if
        the client had uploaded it (so a held prediction does not keep megabytes in memory)."""
        out = dict(inp)
        files = self.runner.files
        for key, value in inp.items():
            if type(value) is not str or len(value) <= self.settings.spill_input_bytes or value[:5].lower() != "data:":
                continue
            try:
                written = await asyncio.to_thread(_decode_and_write, files, value)
                rec = files.register(owner, f"input-{key}", data_url_mime(value), {}, written,
                                     ttl=self.settings.data_retention_seconds)  # as the prediction's data
            except PredictionFailed:
                continue  # not decodable: the prediction fails with the decoder's message
            except (FileTooLarge, StorageFull):
                continue  # kept in memory, within the cap on held inputs
            out[key] = f"{base_url}/v1/files/{rec.id}"
        return out

    # -- routes ---------------------------------------------------------------------------------
    async def create_by_version(self, request: Request) -> Response:
        return await self.create(request, None)

    async def create_by_model(self, request: Request) -> Response:
        p = request.path_params
        return await self.create(request, f"{p['owner']}/{p['name']}")

    async def create_by_deployment(self, request: Request) -> Response:
        p = request.path_params
        return await self.create(request, f"{p['owner']}/{p['name']}", deployment=True)

    def _find(self, request: Request, headers: dict) -> Prediction:
        pred = self.runner.store.get(request.path_params["id"])
        if pred is None:
            raise ApiProblem(404, NOT_FOUND, headers=headers)
        return pred

    async def get_prediction(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        return _json(self._find(request, headers).to_json(), headers=headers)

    async def cancel_prediction(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        pred = self._find(request, headers)
        self.runner.cancel(pred)
        return _json(pred.to_json(), headers=headers)

    async def list_predictions(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        q = request.query_params
        bounds: dict[str, float | None] = {}
        for key in ("created_after", "created_before"):
            bounds[key] = None
            if q.get(key):
                try:
                    bounds[key] = datetime.fromisoformat(q[key].replace("Z", "+00:00")).timestamp()
                except ValueError as exc:
                    raise InputInvalid([(key, "format", "Does not match format 'date-time'")]) from exc
        try:
            page, cursor = self.runner.store.page(
                q.get("cursor"), 100, bounds["created_after"], bounds["created_before"]
            )
        except BadCursor as exc:
            raise InputInvalid([("cursor", "format", str(exc))]) from exc
        nxt = None
        if cursor:
            kept = {k: q[k] for k in ("created_after", "created_before") if q.get(k)}
            nxt = f"{self.base_url(request)}/v1/predictions?" + urlencode({**kept, "cursor": cursor})
        envelope = json.dumps({"previous": None, "next": nxt, "results": []})
        results = ", ".join(p.to_json() for p in page)  # each prediction's cheap encoding, spliced in
        return _json(f"{envelope[:-2]}{results}]}}", headers=headers)

    async def get_version(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        p = request.path_params
        if f"{p['owner']}/{p['name']}" != blip.MODEL or p["id"] != blip.VERSION:
            raise ApiProblem(404, NOT_FOUND, headers=headers)
        return _json(blip.version_json(), headers=headers)

    def _model_path(self, request: Request, headers: dict) -> None:
        p = request.path_params
        if f"{p['owner']}/{p['name']}" != blip.MODEL:
            raise ApiProblem(404, NOT_FOUND, headers=headers)

    async def get_model(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        self._model_path(request, headers)
        return _json(blip.model_json(run_count=self.runner.store.runs), headers=headers)

    async def list_versions(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        self._model_path(request, headers)
        return _json({"previous": None, "next": None, "results": [blip.version_json()]}, headers=headers)

    async def stream_prediction(self, request: Request) -> Response:
        """``urls.stream``: the prediction's server-sent events, from the first (or after
        ``Last-Event-ID``) until ``done``."""
        headers = await self.guard(request, creates=False)
        pred = self._find(request, headers)
        if pred.sse is None:
            raise ApiProblem(404, "This prediction was not created with stream: true, so it has no stream",
                             headers=headers)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0
        return StreamingResponse(
            sse_lines(pred, start),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def webhook_secret(self, request: Request) -> Response:
        headers = await self.guard(request, creates=False)
        return _json({"key": self.settings.webhook_secret}, headers=headers)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": blip.MODEL, "version": blip.VERSION})


async def sse_lines(pred: Prediction, start: int) -> AsyncIterator[str]:
    """Replicate's event stream: ``event: output|logs|error|done``, an ``id`` (the index, for
    ``Last-Event-ID``) and the data, one ``data:`` line per line of it."""
    i = start
    while True:
        assert pred.sse is not None
        while i < len(pred.sse):
            kind, data = pred.sse[i]
            lines = "".join(f"data: {line}\n" for line in data.split("\n"))
            yield f"event: {kind}\nid: {i}\n{lines}\n"
            i += 1
            if kind == "done":
                return
        await pred.sse_waiter().wait()


def _decode_and_write(files: FileStore, data_url: str) -> tuple:
    return files.write_bytes(decode_data_url(data_url))


def create_app(settings: Settings, runner: PredictionRunner | None = None) -> Starlette:
    """The starlette app; the model is loaded (built on first use) when the app starts up."""
    runner = runner or PredictionRunner(settings)
    svc = Service(settings, runner)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.close()

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiProblem)
        return exc.response(getattr(request.state, "ratelimit_headers", None))

    async def on_404(request: Request, exc: Exception) -> Response:
        return ApiProblem(404, NOT_FOUND).response()

    async def on_405(request: Request, exc: Exception) -> Response:
        return ApiProblem(405, "Method not allowed.", title="Method Not Allowed").response()

    routes = [
        Route("/v1/predictions", svc.create_by_version, methods=["POST"]),
        Route("/v1/predictions", svc.list_predictions, methods=["GET"]),
        Route("/v1/predictions/{id}", svc.get_prediction, methods=["GET"]),
        Route("/v1/predictions/{id}/cancel", svc.cancel_prediction, methods=["POST"]),
        Route("/v1/models/{owner}/{name}/predictions", svc.create_by_model, methods=["POST"]),
        Route("/v1/deployments/{owner}/{name}/predictions", svc.create_by_deployment, methods=["POST"]),
        Route("/v1/predictions/{id}/stream", svc.stream_prediction, methods=["GET"]),
        Route("/v1/models/{owner}/{name}", svc.get_model, methods=["GET"]),
        Route("/v1/models/{owner}/{name}/versions", svc.list_versions, methods=["GET"]),
        Route("/v1/models/{owner}/{name}/versions/{id}", svc.get_version, methods=["GET"]),
        *files_routes(svc),
        Route("/v1/webhooks/default/secret", svc.webhook_secret, methods=["GET"]),
        Route("/p/{id}", svc.get_prediction, methods=["GET"]),
        Route("/healthz", svc.healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiProblem: on_problem, 404: on_404, 405: on_405},
    )
    app.state.runner = runner
    app.state.settings = settings
    return app


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets of that proto, and
    # without it every keep-alive answer waits ~40 ms for a delayed ACK (headers and body are two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.set_inheritable(True)
    return sock


def _server(settings: Settings, runner: PredictionRunner | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, runner),
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        http="auto",  # httptools (a dependency) when installed: its C parser costs far less than h11
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency), else None (asyncio's default).

    ``serve()`` runs in the caller's loop, so whoever owns the process picks the loop:
    ``asyncio.Runner(loop_factory=loop_factory())``, as the CLI does.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class StartupError(RuntimeError):
    """The service could not start (model missing and not buildable, port taken, ...)."""


async def _serve_guarded(server: uvicorn.Server, sock: socket.socket, runner: PredictionRunner) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits the process when the lifespan startup fails
        why = runner.startup_error
        raise StartupError(
            f"predictions service failed to start: {why or f'exit status {exc.code}'}"
        ) from why


async def serve(settings: Settings) -> None:
    """Run the service with uvicorn until cancelled (or SIGINT/SIGTERM when run from the CLI)."""
    runner = PredictionRunner(settings)
    sock = _bind(settings)
    host, port = sock.getsockname()[:2]
    log.info(
        "predictions service (salesforce/blip stand-in) on http://%s:%s (event loop: %s, HTTP parser: %s)",
        host,
        port,
        type(asyncio.get_running_loop()).__module__.partition(".")[0],  # "uvloop" or "asyncio"
        "httptools" if importlib.util.find_spec("httptools") else "h11",  # what http="auto" picks
    )
    try:
        await _serve_guarded(_server(settings, runner), sock, runner)
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def running(settings: Settings, runner: PredictionRunner | None = None) -> AsyncIterator[str]:
    """Start the service in this event loop; yields its base URL (``http://127.0.0.1:<port>``).

    Raises StartupError if it cannot start. ``runner`` lets callers share one loaded model
    between several service instances (tests).
    """
    runner = runner or PredictionRunner(settings)
    sock = _bind(settings)
    server = _server(settings, runner)
    task = asyncio.create_task(_serve_guarded(server, sock, runner))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises StartupError
                raise StartupError("predictions service stopped during startup")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
