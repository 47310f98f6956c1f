"""The router: store + engine + delivery, with device state and back-pressure.

Usage::

    settings = RouterSettings(pipelines=["pipeline.yaml"], store_path="data/store.db")
    async with Router(settings) as router:       # loads, validates, opens, starts
        await router.accept(message)              # durable when it returns (IngestTarget)
        await router.accept_many(messages)        # many in one transaction: [added?, ...]
        ...

Stages run in one direction: ``accept`` only writes the inbox; the engine loop reads the
inbox, runs the pipelines and commits deliveries, dead letters and the inbox removal in
one transaction; delivery workers read their queues. ``accept_many`` (what batch ingest
calls: MQTT) routes at ingest (``RouterSettings.route_at_ingest``): a message whose
matching pipelines run only deterministic transformers is routed before it is stored, and
its deliveries are committed with it, in the same transaction, instead of going through the
inbox: the frame's bytes are written once and never read back before delivery. A message
that needs more (a webhook transformer) still goes through the inbox. A crash between two stages loses
nothing: on start the engine re-runs whatever is still in the inbox and the workers
resume their queues (at-least-once; message ids stay the same so receivers can
deduplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipelines.components import ComponentContext
from pipelines.config import LoadResult, PipelineConfig, StepConfig, load_pipelines
from pipelines.delivery import Delivery
from pipelines.engine import Engine, StepTrace, build_pipelines
from pipelines.ingest import Overloaded
from pipelines.log_context import with_message
from pipelines.message import Message
from pipelines.outbound_http import make_client
from pipelines.secrets import SecretSource
from pipelines.state_doc import MAX_STATE_BYTES, delete_at, get_at, merge_at, set_at
from pipelines.store import InboxRow, RoutingOutcome, Store

log = logging.getLogger("pipelines.router")


ENGINE_PAGE = 256  # inbox rows the engine reads at a time
ENGINE_PAGE_SMALL = 1024  # ... while the backlog holds small messages (on average)
SMALL_PAYLOAD = 16 << 10  # bytes


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    elif isinstance(error, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(error)


class ConfigError(Exception):
    """The pipelines did not load; ``problems`` lists every one as FILE:LINE:COL: message."""

    def __init__(self, problems: list[Any]) -> None:
        self.problems = problems
        super().__init__("pipelines did not load:\n" + "\n".join(str(p) for p in problems))


@dataclass
class RouterSettings:
    pipelines: Sequence[str | Path] = ("pipeline.yaml",)
    store_path: str | Path = "pipeline-data/store.db"
    secrets_file: str | Path | None = None
    # rewrite outbound base URLs without editing pipelines, e.g. the predictions API
    url_overrides: dict[str, str] = field(default_factory=dict)
    engine_concurrency: int = 64
    max_inbox: int = 20_000           # accepted but not yet routed: over it → Overloaded
    max_queue: int = 20_000           # rows waiting in any one destination queue: over it → Overloaded
    overload_retry_after: float = 5.0
    http_timeout: float = 30.0
    run_engine: bool = True           # False: an ingest-only process (CoAP workers)
    synchronous: str = "NORMAL"       # SQLite synchronous pragma: NORMAL survives a process crash
    route_at_ingest: bool = True      # accept_many routes local-only pipelines before storing
    # how long prediction -> frame correlations and idempotency keys are kept (predictions end
    # within 30 minutes, webhook retries within minutes)
    correlation_retention: float = 24 * 3600.0
    # the newest rows kept of each record table (None: keep all); older ones are deleted
    keep_stream_rows: int | None = 1_000_000   # lightdb-stream
    keep_log_rows: int | None = 100_000        # the logs destination
    keep_unmatched_rows: int | None = 10_000   # messages no pipeline matched
    housekeeping_interval: float = 60.0        # seconds between the pruning rounds
    max_state_bytes: int = MAX_STATE_BYTES     # a device's whole state document, as JSON
    extra: dict[str, Any] = field(default_factory=dict)


class Router:
    def __init__(self, settings: RouterSettings, *, loaded: LoadResult | None = None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.store = Store(settings.store_path, synchronous=settings.synchronous,
                           max_state_bytes=settings.max_state_bytes)
        self.http: httpx.AsyncClient | None = None
        self.engine: Engine | None = None
        self.delivery: Delivery | None = None
        self.pipeline_configs: list[PipelineConfig] = []
        self._routing: set[asyncio.Task] = set()  # messages being routed now
        self._watchers: dict[tuple[str, str], list[Callable[[], None]]] = {}
        self._watched_versions: dict[tuple[str, str], int] = {}
        # ingest front ends (CoAP) add collectors here for GET /metrics (pipelines.metrics)
        self.metric_sources: list[Callable[[], Iterable[Any]]] = []
        self._tasks: list[asyncio.Task] = []
        self._inbox_event = asyncio.Event()
        self._in_progress: set[str] = set()
        # routing outcomes waiting to be committed, with whom to tell (see _finish_later)
        self._to_finish: list[tuple[Message, RoutingOutcome, Callable[[BaseException | None], None]]] = []
        self._finishers: set[asyncio.Task] = set()
        self._last_seq = 0
        self._overload_reason: str | None = None
        self.queue_depths: dict[tuple[str, str], int] = {}
        self.inbox_depth = 0
        self.started_at = time.time()
        self.ready = False
        self._response_hooks: list[Callable[[Message, str, httpx.Response], Awaitable[None]]] = []
        self._request_hooks: list[Callable[[Message, str], Message | None]] = []
        # observers (the web console): told of every message accepted and every state write
        self.on_accepted: list[Callable[[Sequence[Message]], None]] = []
        self.on_state_written: list[Callable[[str, str, str, Any], None]] = []
        # hot reload (see ``reload``): the configuration's generation, refused reloads and why
        self.generation = 1
        self.reload_failures = 0
        self.reload_problems: list[str] = []
        self._retiring: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def load(self) -> LoadResult:
        if self.loaded is None:
            secrets = SecretSource.from_sources(
                Path(self.settings.secrets_file) if self.settings.secrets_file else None)
            self.loaded = load_pipelines(list(self.settings.pipelines), secrets)
        if self.loaded.problems:
            raise ConfigError(self.loaded.problems)
        return self.loaded

    async def start(self) -> None:
        loaded = self.load()
        self.pipeline_configs = loaded.pipelines
        try:
            await self.store.open()
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
            self.http = make_client(timeout=self.settings.http_timeout, limits=limits)
            if self.settings.run_engine:
                runtime = build_pipelines(self.pipeline_configs, self._context_for)
                self.engine = Engine(runtime)
                self.delivery = Delivery(self.store, runtime)
                await self._dead_letter_orphaned_queues()
                await self.delivery.start()
                self._tasks.append(asyncio.create_task(self._engine_loop(), name="engine"))
            else:
                self._tasks.append(asyncio.create_task(self._poll_state_loop(), name="state-poll"))
            self._tasks.append(asyncio.create_task(self._monitor_loop(), name="monitor"))
            await self._measure()
        except BaseException:
            await self.stop()  # no writer thread, client or task left behind
            raise
        self.ready = True

    async def _dead_letter_orphaned_queues(self) -> None:
        """Deliveries queued for a step the pipelines no longer have (renamed or removed since
        they were queued) would wait forever and hold ingest shut: make them dead letters,
        which ``pipeline dlq replay`` can send on once the step is back."""
        assert self.delivery is not None
        for (pipeline, step), n in (await self.store.queue_depths()).items():
            if (pipeline, step) in self.delivery.workers:
                continue
            log.warning("%d deliveries wait for %s/%s, which the pipelines no longer have: "
                        "moved to dead letters", n, pipeline, step)
            while rows := await self.store.due_deliveries(pipeline, step, float("inf"), 500, set()):
                for row in rows:
                    await self.store.delivery_dead(
                        row, attempts=row.attempts, status=None, response_excerpt=None,
                        error=f"step {pipeline}/{step} is no longer in the pipelines")

    async def open_for_replay(self) -> None:
        """Store, HTTP client and engine, without the engine loop, delivery workers or
        monitor: what ``pipeline dlq replay`` needs beside (or instead of) a running router.
        Replayed deliveries wait in their queues for a router to deliver them."""
        loaded = self.load()
        self.pipeline_configs = loaded.pipelines
        await self.store.open()
        self.http = make_client(timeout=self.settings.http_timeout)
        self.engine = Engine(build_pipelines(self.pipeline_configs, self._context_for))

    async def reload(self, loaded: LoadResult) -> None:
        """Swap in a new, already validated set of pipelines between messages.

        Messages whose routing started keep the engine they started with (each is routed
        once, by the old or the new pipelines); new ones go by the new set. Delivery queues
        of steps that still exist (same pipeline and step name) keep going with the new
        step's destination and settings; steps that are gone stop, and what still waits
        for them becomes dead letters once the old engine's routes are committed (as at
        start: ``pipeline dlq replay`` sends them on if the step comes back). Raises
        ``ConfigError`` (nothing changed) if the set has problems or does not build."""
        if loaded.problems:
            raise ConfigError(loaded.problems)
        if not self.settings.run_engine or self.engine is None or self.delivery is None:
            self.loaded, self.pipeline_configs = loaded, loaded.pipelines
            self.generation += 1
            return
        try:
            runtime = build_pipelines(loaded.pipelines, self._context_for)
        except Exception as exc:
            raise ConfigError([f"the pipelines did not build: {type(exc).__name__}: {exc}"]) from exc
        old = self.engine
        engine = Engine(runtime)
        engine.generation = self.generation + 1
        engine.transform_failed = old.transform_failed
        # no await between these two: the engine loop sees either the old set or the new one
        self.engine = engine
        self.loaded, self.pipeline_configs = loaded, loaded.pipelines
        busy = {t for t in self._routing if not t.done()}
        busy |= await self.delivery.update(runtime, engine.generation)
        self.generation += 1
        task = asyncio.create_task(self._retire(old, busy), name="retire-engine")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: Engine, busy: set[asyncio.Task], grace: float = 60.0) -> None:
        """Once what started on the old configuration is done: close its components and make
        dead letters of deliveries left for steps the new one no longer has."""
        try:
            if busy:
                await asyncio.wait(busy, timeout=grace)
            await self._dead_letter_orphaned_queues()
        finally:
            await old.close()

    async def stop(self) -> None:
        self.ready = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # a message cut off mid-route stays in the inbox and is routed again on the next start
        for t in list(self._routing):
            t.cancel()
        await asyncio.gather(*self._routing, return_exceptions=True)
        for t in list(self._retiring):
            t.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for _, _, tell in self._to_finish:  # never committed: routed again on the next start
            tell(asyncio.CancelledError())
        self._to_finish.clear()
        if self.delivery:
            await self.delivery.stop()
        if self.engine:
            await self.engine.close()
        if self.http:
            await self.http.aclose()
        await self.store.close()

    def _context_for(self, pipeline: PipelineConfig, step: StepConfig) -> ComponentContext:
        return ComponentContext(
            http=self.http, state=self, stream=self.store, logs=self.store, reinject=self.accept,
            mqtt_publish=self.settings.extra.get("mqtt_publish"),
            pipeline=pipeline.name, step=step.name,
            extra={"url_overrides": self.settings.url_overrides,
                   "timeout": step.timeout or self.settings.http_timeout,
                   "retry": step.retry,
                   "request_hooks": self._request_hooks,
                   "response_hooks": self._response_hooks},
        )

    def add_http_hooks(self, *, request: Callable[[Message, str], Message | None] | None = None,
                       response: Callable[[Message, str, httpx.Response], Awaitable[None]] | None = None
                       ) -> None:
        """Let a router feature see outbound webhook calls (the predictions correlation)."""
        if request:
            self._request_hooks.append(request)
        if response:
            self._response_hooks.append(response)

    # -- ingest (IngestTarget) ----------------------------------------------------------

    async def accept(self, message: Message, dedup_key: str | None = None) -> bool:
        """Durably store ``message``; False when it was a duplicate (same id, or ``dedup_key``
        seen before). Raises ``Overloaded`` when the router pushes back."""
        if self._overload_reason:
            raise Overloaded(self._overload_reason, self.settings.overload_retry_after)
        added = await self.store.add_inbox(message, dedup_key)
        if added:
            self.inbox_depth += 1
            self._inbox_event.set()
            self._tell_accepted((message,))
        return added

    async def accept_many(self, messages: Sequence[Message],
                          dedup_keys: Sequence[str | None] | None = None) -> list[bool]:
        """``accept`` for many messages at once: one store operation and one transaction
        for all. Returns, once they are all committed, one answer per message (False: a
        duplicate, also of an earlier message of the same batch). Raises ``Overloaded``
        (nothing stored) when the router pushes back."""
        if self._overload_reason:
            raise Overloaded(self._overload_reason, self.settings.overload_retry_after)
        outcomes: list[RoutingOutcome | None] | None = None
        engine = self.engine
        if engine is not None and self.settings.route_at_ingest:
            outcomes = [(await engine.route(m))[0] if engine.routes_locally(m) else None for m in messages]
        added = await self.store.add_inbox_many(messages, dedup_keys, outcomes)
        n = 0
        for i, ok in enumerate(added):
            outcome = outcomes[i] if outcomes is not None else None
            if not ok:
                continue
            if outcome is None:
                n += 1
            elif self.delivery is not None:
                for d in outcome.deliveries:  # committed: straight to their queues, no read back
                    self.delivery.offer(d)
        if n:
            self.inbox_depth += n
            self._inbox_event.set()
            if self.on_accepted:
                self._tell_accepted([m for m, a in zip(messages, added, strict=True) if a])
        return added

    def _tell_accepted(self, messages: Sequence[Message]) -> None:
        for cb in self.on_accepted:
            try:
                cb(messages)
            except Exception:  # an observer must never cost a message
                log.exception("observer of accepted messages failed")

    # -- the engine loop ----------------------------------------------------------------

    async def _engine_loop(self) -> None:
        assert self.engine is not None
        sem = asyncio.Semaphore(self.settings.engine_concurrency)
        unmatched = asyncio.Semaphore(1024)  # messages no pipeline wants cost no routing
        ahead: asyncio.Task | None = None
        page = ENGINE_PAGE
        try:
            while True:
                self._inbox_event.clear()
                try:
                    if ahead is None:
                        page = ENGINE_PAGE
                        rows = await self.store.fetch_inbox(self._last_seq, page)
                    else:
                        rows, ahead = await ahead, None
                except Exception:
                    ahead = None
                    log.exception("reading the inbox")
                    await asyncio.sleep(1)
                    continue
                full = len(rows) == page
                if full:
                    # a backlog: read the next page while this one is being routed. Batch
                    # ingest stores up to ~1000 messages per commit; with one 256-row page
                    # per commit the engine would fall behind, so small messages come in
                    # pages of 1024 (large ones stay at 256: they are held in memory)
                    small = sum(len(r.message.payload) for r in rows) <= len(rows) * SMALL_PAYLOAD
                    page = ENGINE_PAGE_SMALL if small else ENGINE_PAGE
                    ahead = asyncio.create_task(self.store.fetch_inbox(rows[-1].seq, page))
                await self._route_page(rows, sem, unmatched)
                if not full:
                    # other processes (CoAP workers) write the inbox too: look again soon
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                    # cancel that lands as the event fires, and stop() then waits forever
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._inbox_event.wait()
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _route_page(self, rows: list[InboxRow], sem: asyncio.Semaphore,
                          unmatched: asyncio.Semaphore) -> None:
        assert self.engine is not None
        for row in rows:
            self._last_seq = max(self._last_seq, row.seq)
            message = row.message
            if message.id in self._in_progress:
                continue
            if not self.engine.matching(message):
                # nothing to run: record it with the others, without a task of its own
                await unmatched.acquire()
                self._in_progress.add(message.id)
                outcome = RoutingOutcome(matched=False, deliveries=[], dead=[])
                self._finish_later(message, outcome, functools.partial(
                    self._unmatched_finished, message, outcome, unmatched))
                continue
            await sem.acquire()
            self._in_progress.add(message.id)
            # the engine that matched it routes it, even if a reload swaps engines meanwhile
            t = asyncio.create_task(self._route_one(message, sem, self.engine))
            self._routing.add(t)
            t.add_done_callback(self._routing.discard)

    async def _route_one(self, message: Message, sem: asyncio.Semaphore, engine: Engine) -> None:
        backoff = 0.5
        with_message(message)  # this task's log lines name the message (pipelines.log_context)
        try:
            while True:
                try:
                    assert self.delivery is not None
                    outcome, _ = await engine.route(message)
                    fut = self._finish_later(message, outcome)
                    assert fut is not None
                    await fut
                    self._finished(message, outcome, None)
                    return
                except asyncio.CancelledError:
                    self._in_progress.discard(message.id)
                    raise
                except Exception:
                    # the message is still in the inbox (nothing was committed): try again after a
                    # pause, as a busy or full store may recover; a restart would also pick it up
                    log.exception("routing message %s failed; trying again in %.1f s", message.id, backoff)
                    await asyncio.sleep(backoff)
                    engine = self.engine or engine  # a retry goes by the newest configuration
                    backoff = min(backoff * 2, 30.0)
        finally:
            sem.release()

    def _unmatched_finished(self, message: Message, outcome: RoutingOutcome, sem: asyncio.Semaphore,
                            error: BaseException | None) -> None:
        sem.release()
        self._finished(message, outcome, error)

    def _finished(self, message: Message, outcome: RoutingOutcome, error: BaseException | None) -> None:
        """``message`` is routed (or, after ``error``, stays in the inbox for the next start)."""
        self._in_progress.discard(message.id)
        if error is not None:
            if not isinstance(error, asyncio.CancelledError):
                log.error("recording the routing of message %s failed; it stays in the inbox: %r",
                          message.id, error)
            return
        self.inbox_depth = max(0, self.inbox_depth - 1)
        assert self.delivery is not None
        for d in outcome.deliveries:
            self.delivery.notify(d.pipeline, d.step)

    def _finish_later(self, message: Message, outcome: RoutingOutcome,
                      done: Callable[[BaseException | None], None] | None = None) -> asyncio.Future | None:
        """Commit a routing outcome together with the others that are ready: one store
        operation for all that finished while earlier batches were being committed (no
        timer: a lone one goes at once). Then ``done(None)``, or ``done(error)``; without
        ``done`` a future is returned instead, done once this one is committed."""
        fut = None
        if done is None:
            fut = asyncio.get_running_loop().create_future()
            done = functools.partial(_settle, fut)
        self._to_finish.append((message, outcome, done))
        # two batches at once: one is being committed while the next one fills
        if len(self._finishers) < 2:
            task = asyncio.create_task(self._finish_loop(), name="finish")
            for group in (self._finishers, self._routing):
                group.add(task)
                task.add_done_callback(group.discard)
        return fut

    async def _finish_loop(self) -> None:
        batch: list[tuple[Message, RoutingOutcome, Callable[[BaseException | None], None]]] = []
        try:
            while self._to_finish:
                batch, self._to_finish = self._to_finish[:1024], self._to_finish[1024:]
                errors: list[BaseException | None] = [None] * len(batch)
                try:
                    await self.store.finish_messages([(m, o) for m, o, _ in batch])
                except Exception:
                    # one message that cannot be recorded must not hold back the others
                    for i, (m, o, _) in enumerate(batch):
                        try:
                            await self.store.finish_message(m, o)
                        except Exception as exc:
                            errors[i] = exc
                done, batch = batch, []
                for (_, _, tell), exc in zip(done, errors, strict=True):
                    tell(exc)
        finally:  # cancelled (stop): these stay in the inbox and are routed on the next start
            for _, _, tell in batch:
                tell(asyncio.CancelledError())

    async def send(self, message: Message) -> tuple[Any, list[StepTrace]]:
        """Route one message now, with a trace of every step (``pipeline send``). The
        message goes through the inbox like any other, so nothing is lost if we stop."""
        assert self.engine is not None and self.delivery is not None
        self._in_progress.add(message.id)
        try:
            await self.store.add_inbox(message)
            outcome, trace = await self.engine.route(message, trace=True)
            await self.store.finish_message(message, outcome)
            for d in outcome.deliveries:
                self.delivery.notify(d.pipeline, d.step)
            return outcome, trace
        finally:
            self._in_progress.discard(message.id)

    async def replay_dead_letter(self, dead_letter_id: int) -> bool:
        """Re-run a dead letter from the step that failed (same message id). False if it
        is unknown or already replayed; LookupError if its pipeline or step is gone."""
        assert self.engine is not None
        letters = await self.store.dead_letters(ids=[dead_letter_id])
        if not letters:
            return False
        dl = letters[0]
        pipeline = self.engine.by_name.get(dl.pipeline)
        if pipeline is None:
            raise LookupError(f"pipeline {dl.pipeline!r} is no longer loaded")
        if dl.step_index >= len(pipeline.steps) or pipeline.steps[dl.step_index].name != dl.step:
            raise LookupError(f"pipeline {dl.pipeline!r} has no step {dl.step!r} at position "
                              f"{dl.step_index + 1} any more")
        if dl.stage == "delivery":
            if pipeline.steps[dl.step_index].destination is None:
                raise LookupError(f"step {dl.pipeline}/{dl.step} has no destination any more")
            ok = await self.store.requeue_dead_letter(dl)
            if self.delivery:
                self.delivery.notify(dl.pipeline, dl.step)
            return ok
        deliveries, dead, _ = await self.engine.run_pipeline(pipeline, dl.message, dl.step_index)
        outcome = RoutingOutcome(True, deliveries, dead, runs_completed=0 if dead else 1,
                                 runs_dead=1 if dead else 0, from_inbox=False)
        if not await self.store.finish_replay(dl.id, dl.message, outcome):
            return False
        for d in deliveries:
            if self.delivery:
                self.delivery.notify(d.pipeline, d.step)
        return True

    # -- back-pressure ------------------------------------------------------------------

    @property
    def overload_reason(self) -> str | None:
        return self._overload_reason

    async def _measure(self) -> None:
        self.queue_depths = await self.store.queue_depths()
        self.inbox_depth = await self.store.inbox_size()
        reason = None
        if self.inbox_depth >= self.settings.max_inbox:
            reason = f"{self.inbox_depth} messages wait to be routed (limit {self.settings.max_inbox})"
        else:
            for (p, s), n in self.queue_depths.items():
                if n >= self.settings.max_queue:
                    reason = (f"destination queue {p}/{s} holds {n} deliveries "
                              f"(limit {self.settings.max_queue})")
                    break
        if reason != self._overload_reason:
            if reason:
                log.warning("pushing back on ingest: %s", reason)
            elif self._overload_reason:
                log.info("ingest open again")
        self._overload_reason = reason

    async def _monitor_loop(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(0.25)
            try:
                await self._measure()
                if self.settings.run_engine and time.monotonic() - last_prune > self.settings.housekeeping_interval:
                    last_prune = time.monotonic()
                    await self.store.prune_correlations(time.time() - self.settings.correlation_retention)
                    s = self.settings
                    gone = await self.store.prune_records({"stream": s.keep_stream_rows, "logs": s.keep_log_rows,
                                                           "unmatched": s.keep_unmatched_rows})
                    if any(gone.values()):
                        log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in gone.items() if n))
            except Exception:
                log.exception("measuring queues")

    # -- device state (IngestTarget + the StateStore that lightdb-state uses) -------------

    async def get_state(self, project_id: str, device_id: str, path: str = "/") -> Any:
        doc, _ = await self.store.get_state(project_id, device_id)
        return get_at(doc, path)

    async def set_state(self, project_id: str, device_id: str, path: str, value: Any,
                        merge: bool = False) -> None:
        if merge:
            await self.store.update_state(project_id, device_id, lambda d: merge_at(d, path, value))
        else:
            await self.store.update_state(project_id, device_id, lambda d: set_at(d, path, value))
        self._changed(project_id, device_id)
        for cb in self.on_state_written:
            try:
                cb(project_id, device_id, path, value)
            except Exception:
                log.exception("observer of state writes failed")

    async def merge_state(self, project_id: str, device_id: str, path: str, value: Any) -> None:
        await self.set_state(project_id, device_id, path, value, merge=True)

    async def delete_state(self, project_id: str, device_id: str, path: str) -> None:
        await self.store.update_state(project_id, device_id, lambda d: delete_at(d, path))
        self._changed(project_id, device_id)

    def watch_state(self, project_id: str, device_id: str,
                    callback: Callable[[], None]) -> Callable[[], None]:
        key = (project_id, device_id)
        self._watchers.setdefault(key, []).append(callback)
        # ingest-only processes poll for changes: -1 makes the first poll report one, in case
        # the document changed between the observer's first read and that poll (observers skip
        # a notification whose document did not change)
        self._watched_versions[key] = -1

        def unwatch() -> None:
            lst = self._watchers.get(key, [])
            if callback in lst:
                lst.remove(callback)
            if not lst:
                self._watchers.pop(key, None)
                self._watched_versions.pop(key, None)
        return unwatch

    def _changed(self, project_id: str, device_id: str) -> None:
        for cb in list(self._watchers.get((project_id, device_id), [])):
            try:
                cb()
            except Exception:
                log.exception("state watcher failed")

    async def _poll_state_loop(self) -> None:
        """Ingest-only processes do not see the engine's writes: look at versions instead."""
        while True:
            await asyncio.sleep(0.1)
            keys = list(self._watchers)
            if not keys:
                continue
            try:
                versions = await self.store.state_versions(keys)
            except Exception:
                log.exception("polling state versions")
                continue
            for key, v in versions.items():
                old = self._watched_versions.get(key)
                self._watched_versions[key] = v
                if old is not None and v != old:
                    self._changed(*key)
