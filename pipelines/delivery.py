"""Delivery: one durable queue and one worker pool per destination step.

Usage::

    delivery = Delivery(store, pipelines)     # RuntimePipelines from pipelines.engine
    await delivery.start()
    delivery.notify("camera", "predict")      # new rows were enqueued for that step
    await delivery.stop()

Each ``QueueWorker`` reads due rows of its own (pipeline, step) queue from the store,
delivers up to ``max_in_flight`` at once at no more than ``rate`` per second, and
records the outcome: delivered (row deleted), retry (row rescheduled per the step's
``RetryPolicy``, honouring ``Retry-After``), or dead letter (exact bytes kept). A slow or
dead destination only ever holds its own workers: the others never wait for it, and its
backlog waits in the store, not in memory (the router pushes back on ingest when one
queue reaches ``RouterSettings.max_queue``).

A row leaves the store only once its outcome is committed, so a crash at any point means
the row is delivered again after the restart (at-least-once, same message id). Rows are
read ahead in batches (``prefetch``) and successes are written in batches (at most
``DONE_FLUSH_DELAY`` late), which keeps store round trips off the per-message path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from pipelines.components import ComponentError, DeliveryError, Destination
from pipelines.engine import RuntimePipeline, RuntimeStep, rebuild_message
from pipelines.log_context import with_message, with_step
from pipelines.metrics import LatencyHistogram
from pipelines.retry import RetryPolicy
from pipelines.secrets import redact
from pipelines.store import DeliveryRow, PendingDelivery, Store

log = logging.getLogger("pipelines.delivery")

# requests a destination step has in flight unless its ``max_in_flight`` says otherwise: a
# queue delivers at most this many per round-trip time (16 capped camera frames to a webhook
# at ~1,000/s once a loaded machine stretched round trips to ~15 ms: bench/frames_to_webhook.py)
DEFAULT_MAX_IN_FLIGHT = 64
IDLE_POLL = 1.0  # seconds between looks at the queue when nothing wakes the worker
DONE_FLUSH_DELAY = 0.01  # successes are recorded in batches at most this much later


@dataclass
class QueueStats:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    in_flight: int = 0
    retries_by_status: dict[str, int] = field(default_factory=dict)
    dead_by_reason: dict[str, int] = field(default_factory=dict)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


KEEP_GENERATIONS = 16  # configurations whose pipelines a queue keeps for rebuilding requests


class QueueWorker:
    """One destination step's queue. Rows move: store -> ``_buffer`` (prefetched, payloads
    in memory, bounded) -> in flight (at most ``max_in_flight``) -> outcome written. A row
    stays in ``_held`` from the moment it is read until its outcome is committed, so a
    later read never hands out a row already being worked on."""

    def __init__(self, store: Store, pipeline: str, step: RuntimeStep,
                 runtime: RuntimePipeline | None = None) -> None:
        assert step.destination is not None
        self.store = store
        self.pipeline = pipeline
        self.runtime = runtime  # rebuilds the request of rows stored with rebuild set
        # the pipeline of each recent configuration generation: a row is rebuilt by the steps
        # that routed it, even across a reload (older or unknown generations: the current one)
        self.runtimes: dict[int, RuntimePipeline] = {0: runtime} if runtime is not None else {}
        self.stats = QueueStats()
        self.latency = LatencyHistogram()
        self.use_step(step)
        self._wake = asyncio.Event()
        self._buffer: deque[DeliveryRow] = deque()
        self._held: set[int] = set()
        self._done: list[int] = []
        self._flusher: asyncio.Task | None = None
        # the store may hold due rows not in _buffer or _held (False only after a read found
        # all of them and since then every new row was handed over by offer)
        self._unread = True
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def use_step(self, step: RuntimeStep) -> None:
        """Deliver with ``step``'s destination and settings from now on (a reload); deliveries
        under way finish with the destination they started with."""
        assert step.destination is not None
        self.step = step
        self.destination: Destination = step.destination
        cfg = step.config
        self.policy: RetryPolicy = cfg.retry or RetryPolicy()
        self.max_in_flight = cfg.max_in_flight or DEFAULT_MAX_IN_FLIGHT
        # read ahead so a freed slot never waits for a store round trip; bounded so a big
        # backlog stays on disk, not in memory
        self.prefetch = max(4 * self.max_in_flight, 64)
        self.timeout = cfg.timeout
        self.bucket = TokenBucket(cfg.rate) if cfg.rate else None

    @property
    def key(self) -> tuple[str, str]:
        return self.pipeline, self.step.name

    def notify(self) -> None:
        self._unread = True  # new rows in the store
        self._wake.set()

    def offer(self, delivery: PendingDelivery) -> None:
        """A delivery of this queue was just committed (``delivery.seq`` set): take it into
        the buffer as it is, request and all, when there is room, rather than reading it back
        from the store. Either way the queue is woken."""
        seq = delivery.seq
        if seq is not None and seq not in self._held and len(self._buffer) < self.prefetch:
            self._held.add(seq)
            self._buffer.append(DeliveryRow(seq, self.pipeline, delivery.step, delivery.step_index, 0, None,
                                            delivery.message))
        else:
            self._unread = True  # no room: it is read from the store later
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"delivery:{self.pipeline}/{self.step.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flusher:  # let the last successes reach the store: fewer duplicates on restart
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._fill()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the worker alive whatever the store says
                log.exception("delivery worker %s/%s", *self.key)
                await asyncio.sleep(1)

    async def _fill(self) -> None:
        self._wake.clear()
        # refill at half: the store may be busy (a WAL checkpoint) and the buffer must not run dry;
        # only when the store may hold rows nobody handed over (see offer)
        if self._unread and len(self._buffer) <= self.prefetch // 2:
            want = self.prefetch - len(self._buffer)
            self._unread = False
            try:
                rows = await self.store.due_deliveries(self.pipeline, self.step.name, time.time(), want,
                                                       set(self._held))
            except BaseException:
                self._unread = True
                raise
            if len(rows) >= want:
                self._unread = True  # there may be more
            for row in rows:
                if row.seq not in self._held:
                    self._held.add(row.seq)
                    self._buffer.append(row)
        while self._buffer and self.stats.in_flight < self.max_in_flight:
            row = self._buffer.popleft()
            self.stats.in_flight += 1
            task = asyncio.create_task(self._deliver(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._wake.is_set():
            return
        if self._buffer or self.stats.in_flight >= self.max_in_flight:
            await self._wake.wait()  # a slot frees up
            return
        wait = IDLE_POLL
        if self._unread:  # rows wait in the store (retries): wake when the first is due
            nxt = await self.store.next_due_time(self.pipeline, self.step.name, set(self._held))
            if nxt is not None:
                wait = max(0.0, min(IDLE_POLL, nxt - time.time()))
        if wait > 0 and not self._wake.is_set():
            try:
                async with asyncio.timeout(wait):  # not wait_for: see Router._engine_loop
                    await self._wake.wait()
            except TimeoutError:
                self._unread = True  # look at the store again (other writers, due retries)

    def _succeeded(self, seq: int) -> None:
        # successes are written in batches: one transaction for all that finished meanwhile
        self._done.append(seq)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_done())

    async def _flush_done(self) -> None:
        while self._done:
            # gather the successes of the next few milliseconds into the same write
            await asyncio.sleep(DONE_FLUSH_DELAY)
            batch, self._done = self._done, []
            try:
                await self.store.deliveries_done(batch)
            except Exception:
                # not recorded: the rows stay queued and are delivered again (at-least-once)
                log.exception("recording %d deliveries of %s/%s", len(batch), *self.key)
            finally:
                self._held.difference_update(batch)
                self._wake.set()

    async def _deliver(self, row: DeliveryRow) -> None:
        with_message(row.message)  # this task's log lines name the message and step
        with_step(self.pipeline, self.step.name)
        started = time.time()
        attempts = row.attempts + 1
        first = row.first_attempt_at or started
        held = True
        try:
            if self.bucket:
                await self.bucket.take()
            try:
                if row.rebuild:  # the routed message is stored: make the step's request again
                    if self.runtime is None:
                        raise ComponentError(f"delivery {row.seq} needs its pipeline to rebuild the request")
                    runtime = self.runtimes.get(row.rebuild - 1, self.runtime)
                    message = await rebuild_message(runtime, row.step_index, row.step, row.message)
                    # from here on it is the request: a dead letter keeps these exact bytes
                    row = dataclasses.replace(row, message=message, rebuild=0)
                if self.timeout:
                    # asyncio.timeout rather than wait_for: no extra task per delivery
                    async with asyncio.timeout(self.timeout):
                        await self.destination.deliver(row.message)
                else:
                    await self.destination.deliver(row.message)
            except TimeoutError:
                err = DeliveryError(f"timed out after {self.timeout:g} s", retryable=True)
                await self._failed(row, err, attempts, first)
            except DeliveryError as err:
                await self._failed(row, err, attempts, first)
            except ComponentError as exc:
                await self._failed(row, DeliveryError(str(exc), retryable=False), attempts, first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a destination bug: keep the row, retry per policy
                log.exception("destination %s/%s crashed", *self.key)
                err = DeliveryError(f"internal error in {type(exc).__name__}: {exc}", retryable=True)
                await self._failed(row, err, attempts, first)
            else:
                held = False  # the flusher lets go of it once the success is committed
                self.stats.delivered += 1
                # from the first attempt: the message's own time may be the device's clock
                self.latency.observe(time.time() - first)
                self._succeeded(row.seq)
        finally:
            self.stats.in_flight -= 1
            if held:  # rescheduled or failed to record: the row is (still) in the store
                self._held.discard(row.seq)
                self._unread = True
            self._wake.set()

    async def _failed(self, row: DeliveryRow, err: DeliveryError, attempts: int, first: float) -> None:
        try:
            await self._record_failure(row, err, attempts, first)
        except Exception:
            # the outcome could not be written: the row keeps its old schedule, so pause before
            # the slot is released rather than retrying it in a tight loop
            log.exception("delivery %s/%s: could not record the outcome of %s; retrying later",
                          *self.key, row.message.id)
            await asyncio.sleep(1.0)

    async def _record_failure(self, row: DeliveryRow, err: DeliveryError, attempts: int, first: float) -> None:
        reason = redact(err.reason)
        excerpt = redact(err.response_excerpt) if err.response_excerpt else None
        now = time.time()
        status_key = str(err.status) if err.status is not None else "error"
        if self.policy.is_retryable(err) and not self.policy.should_give_up(attempts, now - first):
            delay = self.policy.next_delay(err, attempts)
            self.stats.retried += 1
            self.stats.retries_by_status[status_key] = self.stats.retries_by_status.get(status_key, 0) + 1
            log.info("delivery %s/%s of %s: attempt %d failed (%s); retry in %.2fs",
                     *self.key, row.message.id, attempts, reason, delay)
            await self.store.delivery_retry(row.seq, attempts=attempts, next_attempt_at=now + delay,
                                            first_attempt_at=first, status=err.status, error=reason)
            return
        why = "permanent" if not self.policy.is_retryable(err) else "retries exhausted"
        reason = reason.removesuffix(" (permanent)")  # said once, in front
        self.stats.dead += 1
        dead_key = f"{why}:{status_key}"
        self.stats.dead_by_reason[dead_key] = self.stats.dead_by_reason.get(dead_key, 0) + 1
        log.warning("delivery %s/%s of %s from %s → dead letter after %d attempt(s): %s",
                    *self.key, row.message.id, row.message.device_id, attempts, reason)
        await self.store.delivery_dead(row, attempts=attempts, status=err.status,
                                       error=f"{why}: {reason}", response_excerpt=excerpt)


class Delivery:
    def __init__(self, store: Store, pipelines: list[RuntimePipeline]) -> None:
        self.store = store
        self.workers: dict[tuple[str, str], QueueWorker] = {}
        for p in pipelines:
            for s in p.steps:
                if s.destination is not None:
                    w = QueueWorker(store, p.name, s, p)
                    self.workers[w.key] = w

    async def start(self) -> None:
        for w in self.workers.values():
            w.start()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()))

    def notify(self, pipeline: str, step: str) -> None:
        w = self.workers.get((pipeline, step))
        if w:
            w.notify()

    def offer(self, delivery: PendingDelivery) -> None:
        """``QueueWorker.offer`` on its queue: a delivery just committed, handed over in memory."""
        w = self.workers.get((delivery.pipeline, delivery.step))
        if w:
            w.offer(delivery)

    async def update(self, pipelines: list[RuntimePipeline], generation: int) -> set[asyncio.Task]:
        """A reload: workers of steps that still exist take the new step; those of steps
        that are gone stop (their rows stay queued in the store); new steps get workers.
        Returns the deliveries still under way with the old destinations."""
        steps = {(p.name, s.name): (s, p) for p in pipelines for s in p.steps if s.destination is not None}
        busy: set[asyncio.Task] = set()
        for key in [k for k in self.workers if k not in steps]:
            await self.workers.pop(key).stop()
        for key, (step, pipeline) in steps.items():
            w = self.workers.get(key)
            if w is None:
                w = self.workers[key] = QueueWorker(self.store, key[0], step, pipeline)
                w.runtimes = {generation: pipeline}
                w.start()
            else:
                busy |= {t for t in w._tasks if not t.done()}
                w.use_step(step)
                w.runtime = w.runtimes[generation] = pipeline
                for old in sorted(w.runtimes)[:-KEEP_GENERATIONS]:
                    del w.runtimes[old]
                w.notify()
        return busy
