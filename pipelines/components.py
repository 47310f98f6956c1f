"""What a transformer or destination is, and how they are registered.

A component is one class in one file::

    from pydantic import BaseModel, Field
    from pipelines.components import Transformer, TransformError
    from transformers.registry import register

    @register
    class ChangeContentType(Transformer):
        type = "change-content-type"
        version = "1.0.0"
        summary = "Relabel the message with another content type; the payload is untouched."

        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            content_type: str = Field(description="The new MIME type.", examples=["image/png"])

        async def transform(self, message: Message) -> Message:
            return message.evolve(content_type=self.params.content_type)

Loading, validation (``FILE:LINE:COL`` errors from the ``Params`` model), docs, metrics
and retries come from the shared machinery, never per component.

Errors, as httpx draws its hierarchy::

    ComponentError                 a step could not do its work for this message
    ├── TransformError             a transformer failed: this pipeline stops for this message
    └── DeliveryError              a destination (or the webhook transformer's call) failed
            .retryable             True: retry per policy (connection error, timeout, 408/425/429/5xx≠501)
            .status                HTTP status or None
            .retry_after           seconds the receiver asked us to wait, or None
            .response_excerpt      first bytes of the answer, secrets redacted later

Third-party components register through the entry-point groups
``iot_pipelines.transformers`` and ``iot_pipelines.destinations`` (value: the class).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

import httpx
from pydantic import BaseModel, ConfigDict

from pipelines.message import Message


class ComponentError(Exception):
    """A component could not do its work for one message."""


class TransformError(ComponentError):
    """A transformer failed for this message; the reason is shown to the user as is."""


class DeliveryError(ComponentError):
    """A delivery (or an outbound HTTP call) failed."""

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        response_excerpt: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.response_excerpt = response_excerpt


class NoParams(BaseModel):
    """For components that take no parameters."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------
# What a destination may use of the router. The router passes an object that satisfies
# this; components never import the router itself.


class StateStore(Protocol):
    async def merge_state(self, project_id: str, device_id: str, path: str, value: Any) -> None: ...


class StreamStore(Protocol):
    async def append_stream(self, project_id: str, device_id: str, path: str, time: float,
                            data: Any) -> None: ...


class LogStore(Protocol):
    async def append_log(self, project_id: str, device_id: str, time: float, level: str,
                         module: str, msg: str, metadata: dict[str, Any]) -> None: ...


@dataclass
class ComponentContext:
    """Services the router lends to components. Any may be ``None`` in a bare context
    (a component that needs a missing one raises ``ComponentError`` saying so)."""

    http: httpx.AsyncClient | None = None
    state: StateStore | None = None
    stream: StreamStore | None = None
    logs: LogStore | None = None
    # re-enters pipeline matching (batch): ``await reinject(message, dedup_key=None)`` returns
    # once the message is in the inbox; raises pipelines.ingest.Overloaded when full
    reinject: Callable[..., Awaitable[Any]] | None = None
    # publishes to the MQTT broker the router is connected to (mqtt destination)
    mqtt_publish: Callable[..., Awaitable[None]] | None = None
    # the pipeline and step this instance serves, for messages and logs
    pipeline: str = ""
    step: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Component:
    """Shared base of transformers and destinations."""

    type: ClassVar[str]
    version: ClassVar[str] = "1.0.0"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    # content types accepted on input; None = any. JSON-only components use ("json",).
    accepts: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, params: BaseModel, context: ComponentContext) -> None:
        self.params = params
        self.context = context

    async def close(self) -> None:
        """Release resources (called when the router stops)."""


class Transformer(Component):
    kind: ClassVar[str] = "transformer"
    # True when the output depends only on the input message and the step's parameters (no
    # clock, network, randomness or state): the router then stores a delivery's input (the
    # frame it already holds) and runs such steps again at delivery, instead of writing their
    # output to the store a second time (see pipelines.engine.rebuild_message)
    deterministic: ClassVar[bool] = False

    async def transform(self, message: Message) -> Message:
        """The step's work. A transformer that needs no waiting implements ``transform_sync``
        instead (this then calls it); one that waits (network, a queue) overrides this."""
        return self.transform_sync(message)

    def transform_sync(self, message: Message) -> Message:
        """The step's work as a plain call, for transformers that never wait (all the
        deterministic built-ins): the engine calls it directly, saving a coroutine per step."""
        raise NotImplementedError(f"{type(self).__name__} implements neither transform nor transform_sync")

    @property
    def has_sync(self) -> bool:
        """True when this transformer's class implements ``transform_sync``."""
        return type(self).transform_sync is not Transformer.transform_sync


class Destination(Component):
    kind: ClassVar[str] = "destination"

    async def deliver(self, message: Message) -> None:
        """Deliver or raise ``DeliveryError``. Returning means delivered."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Registries


_VERSION_RE = re.compile(r"^v(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


def parse_version_selector(selector: str | None) -> tuple[int, ...] | None:
    """``v1`` → (1,), ``v1.0`` → (1, 0), ``v1.0.0`` → (1, 0, 0), None → None (newest).
    Raises ValueError for anything else."""
    if selector is None:
        return None
    m = _VERSION_RE.match(str(selector).strip())
    if not m:
        raise ValueError(f"version {selector!r} is not of the form v1, v1.0 or v1.0.0")
    return tuple(int(g) for g in m.groups() if g is not None)


def _semver(v: str) -> tuple[int, int, int]:
    a, b, c = (int(x) for x in v.split("."))
    return a, b, c


class Registry:
    """Components of one kind by type name, each possibly in several versions."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._by_type: dict[str, list[type[Component]]] = {}
        # types Golioth has that we recognise but do not implement: name -> reason
        self.unsupported: dict[str, str] = {}
        self._loaded_entry_points = False

    def register(self, cls: type[Component]) -> type[Component]:
        versions = self._by_type.setdefault(cls.type, [])
        versions[:] = [c for c in versions if c.version != cls.version] + [cls]
        versions.sort(key=lambda c: _semver(c.version))
        return cls

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group):
            self.register(ep.load())

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._by_type)

    def resolve(self, type_name: str, selector: str | None = None) -> type[Component]:
        """The newest registered version matching ``selector``. Raises LookupError with a
        message fit for the user (unknown type, unsupported type, no such version)."""
        self._load_entry_points()
        if type_name not in self._by_type:
            if type_name in self.unsupported:
                raise LookupError(f"{self.kind} type {type_name!r} is not supported yet: "
                                  f"{self.unsupported[type_name]}")
            raise LookupError(f"unknown {self.kind} type {type_name!r}")
        wanted = parse_version_selector(selector)
        candidates = self._by_type[type_name]
        if wanted is not None:
            candidates = [c for c in candidates if _semver(c.version)[: len(wanted)] == wanted]
        if not candidates:
            known = ", ".join("v" + c.version for c in self._by_type[type_name])
            raise LookupError(f"{self.kind} {type_name!r} has no version {selector} (known: {known})")
        return candidates[-1]
