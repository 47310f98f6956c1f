"""Prometheus metrics for one router, rendered from a snapshot at scrape time.

Usage::

    metrics = RouterMetrics(router)
    text, content_type = await metrics.render()   # what GET /metrics answers

The books (spec §8) come from the store's counters, so they hold across restarts and
across processes sharing the store; per-queue figures come from the live workers.

The accounting identities, all read from one snapshot (one transaction) of the store, so
they hold at every scrape; ``pipeline_books_gap{book=...}`` exports left minus right:

    ingest:              ingested == unmatched + routed + inbox
    deliveries:          deliveries_enqueued == deliveries_delivered + deliveries_dead
                                                + deliveries_queued
    dead_letter_sources: dead_letters == runs_dead + deliveries_dead
    dead_letters:        dead_letters == dead_letters_open + dead_letters_replayed
                                         + dead_letters_purged

``duplicates`` (a message id already waiting in the inbox) are counted apart and never
ingested twice. A replayed delivery dead letter is enqueued again, so it counts once more
in ``deliveries_enqueued`` and then once more as delivered, dead or queued. In flight is a
part of queued: a row leaves ``deliveries`` only when its outcome is committed.

Ingest front ends add their own collectors to ``router.metric_sources`` (callables yielding
metric families): the CoAP ingest exports ``pipeline_coap_rate_limited_total{project,device}``
(requests answered 4.29), ``pipeline_coap_keepalives_total`` and its other counters. With
``serve --workers N`` these are the main process's own (each worker limits its own devices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipelines.ingest.datagram_counts import DATAGRAMS
from pipelines.store import books_gaps

if TYPE_CHECKING:
    from pipelines.router import Router

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))


class _Snapshot:
    def __init__(self, router: Router, books: dict[str, int]) -> None:
        self.router = router
        self.books = books

    def collect(self):  # prometheus_client collector protocol
        r = self.router
        for name, value in sorted(self.books.items()):
            if name in {"inbox", "deliveries_queued", "dead_letters_open", "payloads"}:
                g = GaugeMetricFamily(f"pipeline_{name}", f"current {name.replace('_', ' ')}")
                g.add_metric([], value)
                yield g
            else:
                c = CounterMetricFamily(f"pipeline_{name}", f"messages counted as {name.replace('_', ' ')}")
                c.add_metric([], value)
                yield c
        # the identities of pipelines.store.BOOKS, left minus right: 0 whenever the books hold
        gaps = GaugeMetricFamily("pipeline_books_gap",
                                 "accounting identity left side minus right side (0 = balanced)",
                                 labels=["book"])
        for book, gap in books_gaps(self.books).items():
            gaps.add_metric([book], gap)
        yield gaps
        refused = CounterMetricFamily("pipeline_coap_datagrams_refused",
                                      "CoAP datagrams not taken as they came (this process), by reason",
                                      labels=["reason"])
        for reason, n in sorted(DATAGRAMS.counts().items()):
            refused.add_metric([reason], n)
        yield refused
        depth = GaugeMetricFamily("pipeline_queue_depth", "deliveries waiting per destination step",
                                  labels=["pipeline", "step"])
        # every destination step, empty queues included (a missing series reads as "unknown")
        keys = set(r.queue_depths) | (set(r.delivery.workers) if r.delivery is not None else set())
        for p, s in sorted(keys):
            depth.add_metric([p, s], r.queue_depths.get((p, s), 0))
        yield depth
        gen = GaugeMetricFamily("pipeline_config_generation",
                                "configuration generation: 1 at start, +1 per reload swapped in")
        gen.add_metric([], r.generation)
        refused = CounterMetricFamily("pipeline_config_reload_failures",
                                      "reloads refused (the last good configuration kept serving)")
        refused.add_metric([], r.reload_failures)
        yield from (gen, refused)
        for source in getattr(r, "metric_sources", ()):  # the CoAP ingest's counters, if it runs
            yield from source()
        if r.delivery is None:
            return
        inflight = GaugeMetricFamily("pipeline_deliveries_in_flight", "deliveries under way",
                                     labels=["pipeline", "step"])
        retries = CounterMetricFamily("pipeline_delivery_retries", "retries by status",
                                      labels=["pipeline", "step", "status"])
        dead = CounterMetricFamily("pipeline_delivery_dead_letters", "dead letters by reason",
                                   labels=["pipeline", "step", "reason"])
        delivered = CounterMetricFamily("pipeline_delivery_delivered", "deliveries that succeeded",
                                        labels=["pipeline", "step"])
        hist = HistogramMetricFamily("pipeline_delivery_latency_seconds",
                                     "first attempt to successful delivery", labels=["pipeline", "step"])
        for (p, s), w in r.delivery.workers.items():
            st = w.stats
            inflight.add_metric([p, s], st.in_flight)
            delivered.add_metric([p, s], st.delivered)
            for status, n in st.retries_by_status.items():
                retries.add_metric([p, s, status], n)
            for reason, n in st.dead_by_reason.items():
                dead.add_metric([p, s, reason], n)
            buckets, total = w.latency.snapshot()
            hist.add_metric([p, s], buckets=buckets, sum_value=total)
        yield from (inflight, delivered, retries, dead, hist)
        if r.engine is not None:
            tf = CounterMetricFamily("pipeline_transform_failures", "transformer failures",
                                     labels=["pipeline", "step"])
            for (p, s), n in r.engine.transform_failed.items():
                tf.add_metric([p, s], n)
            yield tf


class LatencyHistogram:
    """Cumulative buckets, cheap to observe from the hot path."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        out, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out, self.total


class RouterMetrics:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def render(self) -> tuple[bytes, str]:
        books = await self.router.store.counters()
        reg = CollectorRegistry()
        reg.register(_Snapshot(self.router, books))
        return generate_latest(reg), CONTENT_TYPE_LATEST
