"""The whole router as one service: router + HTTP face + prediction results + CoAP ingest.

Usage::

    service = RouterService(ServiceSettings(router=RouterSettings(pipelines=["pipeline.yaml"]),
                                            http_port=8080, coap=CoapSettings(registry_path="devices.yaml"),
                                            webhook_secret="whsec_..."))
    async with service:
        print(service.http_url, service.coap_dtls_port)
        ...

``pipeline serve`` runs this headless; ``pipeline run`` adds the local predictions service and
simulated cameras around it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipelines.http_auth import Authenticator
from pipelines.http_face import bound_port, create_app, start_http, stop_http
from pipelines.predictions_results import HOOK_PATH, PredictionResults
from pipelines.reload import ConfigWatcher
from pipelines.router import Router, RouterSettings

log = logging.getLogger("pipelines.service")


@dataclass
class ServiceSettings:
    router: RouterSettings = field(default_factory=RouterSettings)
    http_host: str = "127.0.0.1"
    http_port: int | None = 8080          # None: no HTTP face (and no prediction callbacks)
    coap: Any = None                      # pipelines.ingest.coap.CoapSettings, or None for no CoAP
    mqtt: Any = None                      # pipelines.ingest.mqtt settings, or None for no MQTT
    webhook_secret: str | None = None     # verifies prediction callbacks; None: one kept in the store
    public_url: str | None = None         # how the predictions API reaches us; default: the HTTP face
    console: bool = True                  # the web console at /console on the HTTP face
    watch_config: bool = False            # reload when the pipeline/secrets files change (serve: on)
    protect_metrics: bool = False         # /healthz, /readyz, /metrics want a key too
    http_cert: str | None = None          # PEM certificate and key: the face serves HTTPS
    http_key: str | None = None
    http_tls_self_signed: bool = False    # no cert given: make one in the store's folder on first start


class RouterService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.router = Router(settings.router)
        self.results: PredictionResults | None = None
        self.coap: Any = None
        self.mqtt: Any = None
        self._http: Any = None
        self.console: Any = None
        self.watcher: ConfigWatcher | None = None
        self._tls = False
        self.authenticator: Authenticator | None = None

    @property
    def http_url(self) -> str | None:
        if self._http is None:
            return None
        host = self.settings.http_host
        if host in ("0.0.0.0", "::", ""):  # every interface: loopback reaches it from here
            host = "127.0.0.1" if host != "::" else "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{bound_port(self._http)}"

    @property
    def coap_dtls_port(self) -> int | None:
        return self.coap.dtls_port if self.coap else None

    @property
    def coap_port(self) -> int | None:
        return self.coap.port if self.coap else None

    async def start(self) -> RouterService:
        s = self.settings
        await self.router.start()
        try:
            if self.router.settings.run_engine:
                self.watcher = ConfigWatcher(self.router, also_refresh=[self._refresh_registry])
            if s.http_port is not None:
                self.authenticator = Authenticator(s.router.store_path, host=s.http_host,
                                                   protect_metrics=s.protect_metrics)
                self.authenticator.check_startup()
                certfile, keyfile = s.http_cert, s.http_key
                if s.http_tls_self_signed and not certfile:
                    from pipelines.http_tls import self_signed
                    certfile, keyfile = self_signed(s.router.store_path, s.http_host)
                self._tls = bool(certfile)
                self.results = PredictionResults(self.router, callback_url="(pending)",
                                                 webhook_secret=s.webhook_secret)
                from pipelines.device_services.rpc import http_routes as rpc_routes
                extra = self.results.routes() + rpc_routes(self.router.store)
                if s.console:
                    from pipelines.console import Console
                    self.console = Console(self.router, watcher=self.watcher, sessions=self._sessions)
                    extra.append(self.console.mount())
                app = create_app(self.router, extra_routes=extra, authenticator=self.authenticator)
                if self.console is not None:  # the browser's login form and key cookie
                    from pipelines.console.gate import ConsoleGate
                    app = ConsoleGate(app, authenticate=self.authenticator.authenticate)
                self._http = await start_http(app, s.http_host, s.http_port, certfile=certfile, keyfile=keyfile)
                base = (s.public_url or self.http_url or "").rstrip("/")
                self.results.callback_url = base + HOOK_PATH
                self.results.install()
            if s.coap is not None:
                from pipelines.ingest.coap import CoapIngest
                self.coap = await CoapIngest(self.router, s.coap).start()
            if s.mqtt is not None:
                from pipelines.ingest.mqtt import MqttIngest
                self.mqtt = MqttIngest(self.router, s.mqtt)
                await self.mqtt.start()
            if self.watcher is not None and s.watch_config:
                self.watcher.start()
        except BaseException:
            await self.stop()
            raise
        return self

    def _sessions(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self.coap.device_sessions() if self.coap is not None else {}

    def _refresh_registry(self) -> None:
        if self.coap is not None:
            self.coap.registry.refresh()

    async def reload(self, why: str = "requested") -> bool:
        """Re-read the pipelines and secrets (and the device registry) and swap them in; False
        if they were refused (the last good configuration keeps serving)."""
        if self.watcher is None:
            return False
        return await self.watcher.reload(why)

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.console is not None:
            self.console.close()
        for part in (self.mqtt, self.coap):
            if part is not None:
                try:
                    await part.stop()
                except Exception:
                    log.exception("stopping %s", type(part).__name__)
        self.mqtt = self.coap = None
        if self._http is not None:
            await stop_http(self._http)
            self._http = None
        await self.router.stop()

    async def __aenter__(self) -> RouterService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
