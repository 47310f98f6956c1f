"""The step runner: match a message against every pipeline and run the steps (spec §3–§4).

Usage::

    engine = Engine(pipelines, context_for)       # pipelines from pipelines.config
    outcome, trace = await engine.route(message)  # pure: computes, writes nothing
    await store.finish_message(message, outcome)  # the router commits it

``route`` never raises for a bad message: a transformer's failure becomes a dead letter
of that pipeline and the other pipelines carry on. ``trace`` says what each step did
(``pipeline send`` prints it).

The three step rules:
- transformer only: its output replaces the current message for later steps;
- destination only: the current message is delivered and carries on unchanged;
- both: the transformed message goes only to that step's destination; later steps get
  the message as it was before this step.

Rebuilt deliveries: when every transformer between the message and a destination is
``deterministic`` (a pure function of the message), the delivery also carries the routed
message as its ``source``. The store then keeps that (the frame's bytes, once: the inbox
row's payload passes to the delivery) rather than writing the request body a second time,
and the delivery worker recomputes the request with ``rebuild_message`` just before sending.
The transformers still run at routing time, so a message they reject becomes a dead letter
then, as always; ``PendingDelivery.message`` is the request, as for any delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.components import ComponentContext, ComponentError, Destination, Transformer
from pipelines.log_context import STEP
from pipelines.message import Message
from pipelines.secrets import redact
from pipelines.store import PendingDeadLetter, PendingDelivery, RoutingOutcome

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig, StepConfig

log = logging.getLogger("pipelines.engine")


@dataclass
class StepTrace:
    pipeline: str
    step: str
    action: str  # "transformed" | "enqueued" | "failed"
    content_type: str | None = None
    size: int | None = None
    error: str | None = None
    preview: bytes | None = None
    seconds: float = 0.0


@dataclass
class RuntimeStep:
    config: StepConfig
    index: int
    transformer: Transformer | None
    destination: Destination | None
    pipeline: str = ""
    # set from the above: the transformer's plain-call form, when it has one (no coroutine per
    # message); the (pipeline, step) pair log lines are tagged with; whether the step keeps
    # the message a deterministic function of the routed one
    run_sync: Callable[[Message], Message] | None = field(init=False, default=None)
    log_key: tuple[str, str] = field(init=False, default=("", ""))
    deterministic: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        t = self.transformer
        self.run_sync = t.transform_sync if t is not None and t.has_sync else None
        self.log_key = (self.pipeline, self.config.name)
        self.deterministic = t is None or t.deterministic

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class RuntimePipeline:
    config: PipelineConfig
    steps: list[RuntimeStep] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name


ContextFactory = Callable[["PipelineConfig", "StepConfig"], ComponentContext]


def build_pipelines(configs: list[PipelineConfig], context_for: ContextFactory) -> list[RuntimePipeline]:
    """Instantiate every component once per step."""
    out = []
    for pc in configs:
        rp = RuntimePipeline(pc)
        for i, sc in enumerate(pc.steps):
            ctx = context_for(pc, sc)
            t = sc.transformer.cls(sc.transformer.params, ctx) if sc.transformer else None
            d = sc.destination.cls(sc.destination.params, ctx) if sc.destination else None
            rp.steps.append(RuntimeStep(sc, i, t, d, pc.name))  # type: ignore[arg-type]
        out.append(rp)
    return out


async def rebuild_message(pipeline: RuntimePipeline, step_index: int, step_name: str,
                          message: Message) -> Message:
    """The message step ``step_index`` delivers, recomputed from the routed ``message`` (a
    delivery stored with ``rebuild`` set): the step rules of ``Engine.run_pipeline``, with
    the deterministic transformers the engine ran when it routed the message. Raises
    ``ComponentError`` when the step is not the one the delivery was made for (the pipeline
    changed since) or a transformer now fails."""
    steps = pipeline.steps
    if step_index >= len(steps) or steps[step_index].name != step_name:
        raise ComponentError(f"pipeline {pipeline.name!r} has no step {step_name!r} at position "
                             f"{step_index + 1} any more: the request cannot be rebuilt")
    current = message
    for step in steps[:step_index]:
        if step.transformer is not None and step.destination is None:
            current = step.run_sync(current) if step.run_sync is not None else await step.transformer.transform(current)
    last = steps[step_index]
    if last.transformer is not None:
        current = last.run_sync(current) if last.run_sync is not None else await last.transformer.transform(current)
    return current


class Engine:
    def __init__(self, pipelines: list[RuntimePipeline], *, rebuild: bool = True) -> None:
        self.pipelines = pipelines
        # deliveries after deterministic transformers carry the routed message (module docstring)
        self.rebuild = rebuild
        self.generation = 0  # Router.generation of this set: tags deliveries stored for rebuilding
        # pipelines whose transformers are all deterministic: routing them is local work
        self._local = {p.name: all(s.transformer is None or s.transformer.deterministic for s in p.steps)
                       for p in pipelines}
        self.by_name = {p.name: p for p in pipelines}
        # per (pipeline, step): transformer failures, for metrics
        self.transform_failed: dict[tuple[str, str], int] = {}

    def routes_locally(self, message: Message) -> bool:
        """True when routing ``message`` runs only deterministic transformers (no network, no
        waiting): cheap enough to do before the message is acknowledged."""
        return all(self._local[p.name] for p in self.matching(message))

    def matching(self, message: Message) -> list[RuntimePipeline]:
        return [p for p in self.pipelines
                if p.config.enabled and p.config.filter.matches(message.path, message.content_type)]

    async def route(self, message: Message, *, trace: bool = False) -> tuple[RoutingOutcome, list[StepTrace]]:
        matched = self.matching(message)
        traces: list[StepTrace] = []
        if not matched:
            return RoutingOutcome(matched=False, deliveries=[], dead=[]), traces
        if len(matched) == 1:  # the common case, without the bookkeeping of several
            deliveries, dead, traces = await self.run_pipeline(matched[0], message, 0, trace)
            return RoutingOutcome(True, deliveries, dead, 0 if dead else 1, 1 if dead else 0), traces
        outcome = RoutingOutcome(matched=True, deliveries=[], dead=[])
        results = await asyncio.gather(*(self.run_pipeline(p, message, 0, trace) for p in matched))
        for deliveries, dead, tr in results:
            outcome.deliveries.extend(deliveries)
            outcome.dead.extend(dead)
            traces.extend(tr)
            if dead:
                outcome.runs_dead += 1
            else:
                outcome.runs_completed += 1
        return outcome, traces

    async def run_pipeline(self, pipeline: RuntimePipeline, message: Message, start: int,
                           trace: bool = False
                           ) -> tuple[list[PendingDelivery], list[PendingDeadLetter], list[StepTrace]]:
        deliveries: list[PendingDelivery] = []
        traces: list[StepTrace] = []
        current = message
        # current is a deterministic function of message (rebuild_message can recompute it)
        pure = self.rebuild and start == 0
        steps = pipeline.steps if start == 0 else pipeline.steps[start:]
        for step in steps:
            out = current
            transformer = step.transformer
            if transformer is not None:
                STEP.set(step.log_key)  # log lines name the step (pipelines.log_context)
                t0 = time.perf_counter() if trace else 0.0
                try:
                    run_sync = step.run_sync
                    out = run_sync(current) if run_sync is not None else await transformer.transform(current)
                except Exception as exc:
                    reason = _reason(exc, step)
                    self.transform_failed[(pipeline.name, step.name)] = \
                        self.transform_failed.get((pipeline.name, step.name), 0) + 1
                    log.warning("pipeline %s step %s: message %s from %s dropped to dead letters: %s",
                                pipeline.name, step.name, message.id, message.device_id, reason)
                    if trace:
                        traces.append(StepTrace(pipeline.name, step.name, "failed", error=reason,
                                                seconds=time.perf_counter() - t0))
                    dead = PendingDeadLetter(current, pipeline.name, step.name, step.index,
                                             "transform", reason)
                    return deliveries, [dead], traces
                if trace:
                    traces.append(StepTrace(pipeline.name, step.name, "transformed", out.content_type,
                                            len(out.payload), preview=out.payload[:300],
                                            seconds=time.perf_counter() - t0))
            if step.destination is not None:
                rebuildable = pure and step.deterministic
                deliveries.append(PendingDelivery(out, pipeline.name, step.name, step.index,
                                                  source=message if rebuildable and out is not message else None,
                                                  generation=self.generation))
                if trace:
                    traces.append(StepTrace(pipeline.name, step.name, "enqueued", out.content_type,
                                            len(out.payload)))
            elif transformer is not None:
                current = out  # transformer only: replaces the message for later steps
                pure = pure and step.deterministic
        return deliveries, [], traces

    async def close(self) -> None:
        for p in self.pipelines:
            for s in p.steps:
                for c in (s.transformer, s.destination):
                    if c is not None:
                        try:
                            await c.close()
                        except Exception:  # closing must not stop the others closing
                            log.exception("closing %s", c)


def _reason(exc: BaseException, step: RuntimeStep) -> str:
    if isinstance(exc, ComponentError):
        text = str(exc)
    else:  # a bug in a component: keep the router alive, say what happened
        log.exception("unexpected error in step %s", step.name)
        text = f"internal error in {type(exc).__name__}: {exc}"
    return redact(text)
