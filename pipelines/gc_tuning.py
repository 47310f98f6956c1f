"""Garbage-collector settings for a long-running router process.

    from pipelines.gc_tuning import tune_for_serving
    tune_for_serving()          # once, after start-up: modules, config and connections loaded

CPython's cyclic collector runs a young collection every 700 allocations and, now and then, a
full one that walks every tracked object. At one CoAP request per 1 KB block the router
allocates fast, and aiocoap keeps each exchange for its EXCHANGE_LIFETIME: measured in
``bench/coap_ingest.py``, full collections took a fifth of the ingest CPU. Freezing what start-up
built (it lives as long as the process) takes it out of every collection, and larger thresholds
make collections rarer; reference cycles are still collected, only later.
"""

from __future__ import annotations

import gc

SERVING_THRESHOLDS = (50_000, 20, 100)


def tune_for_serving() -> None:
    """Freeze the start-up heap and collect less often; call once the process is serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
