"""Garbage-collector settings for a long-running router process.

    from pipelines.gc_tuning import tune_for_serving
    tune_for_serving()          # once, after start-up: modules, config and connections loaded
    give_back_memory()          # after freeing much at once (expired uploads): trim the heap

CPython's cyclic collector runs a young collection every 700 allocations and, now and then, a
full one that walks every tracked object. At one CoAP request per 1 KB block the router
allocates fast, and aiocoap keeps each exchange for its EXCHANGE_LIFETIME: measured in
``bench/coap_ingest.py``, full collections took a fifth of the ingest CPU. Freezing what start-up
built (it lives as long as the process) takes it out of every collection, and larger thresholds
make collections rarer; reference cycles are still collected, only later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any

SERVING_THRESHOLDS = (50_000, 20, 100)


def tune_for_serving() -> None:
    """Freeze the start-up heap and collect less often; call once the process is serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)


_libc: Any = None


def give_back_memory() -> bool:
    """Return freed heap pages to the system (glibc ``malloc_trim``); True if it ran.

    Expired Block1 uploads free megabytes of 1 KB-grown buffers at once; glibc keeps such freed
    memory in the process (RSS stays up) until trimmed. Cheap when little is free: call it after
    an expiry sweep that freed a lot, not per request. A no-op where libc is not glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
