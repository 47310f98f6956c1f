"""Block1 (RFC 7959) reassembly with limits: what aiocoap's own spool does, plus a body limit,
a memory cap, expiry, conflict detection and RFC 9175 Request-Tag keys.

Usage (one assembler per server; the CoAP resource calls it for every Block1 request)::

    asm = Block1Assembler(max_body=4 << 20, max_held_bytes=64 << 20, expiry=60.0)
    out = asm.feed(key, num, more, szx, payload, size1=req.opt.size1, token=req.token,
                   content_format=req.opt.content_format)
    if isinstance(out, Continue):  answer 2.31 with Block1 (out.num, True, out.szx)
    elif isinstance(out, Refused): answer out.code (+ Size1 / Max-Age, diagnostic payload)
    else:                          # Complete
        try: ingest out.body, answer 2.04 with Block1 (out.num, False, out.szx)
        finally: asm.release(len(out.body))      # the body counted against the cap until here

The key should identify one upload: (client endpoint, path, Request-Tag). Offsets are tracked in
bytes, so a client that switches to a smaller block size after the server asked for one (the
answer carries the server's SZX, RFC 7959 §2.3) re-indexes and carries on seamlessly.

Tokens (uploads without a distinct Request-Tag share one key; RFC 7959 lets a client keep its
token for all blocks, as the Golioth SDK and libcoap do, or take a new one per block, as aiocoap
does). Each upload remembers its block-0 token and learns from its first continuation block
which kind of client it has:

* **same-token client** (a continuation came with the block-0 token): a block 0 with a *new*
  token is a new upload, the device having given up on the old one (the Golioth SDK restarts
  exactly so): it replaces the old upload. A continuation block with a token that is not the
  upload's gets 4.09 (it belongs to a replaced upload, or to a second upload without
  Request-Tag) and leaves the upload alone: blocks of two uploads are never mixed.
* **new-token-per-block client**, or not known yet (only block 0 seen): a block 0 with another
  token cannot be told from a second upload running at the same time, so it gets 4.09 while
  the upload is active, unless it repeats the stored block 0 byte for byte (a re-sent block 0:
  answered as before, nothing appended, so what is acknowledged stays exactly the bytes sent).
* any upload idle for longer than ``restart_grace`` is stale: a block 0 replaces it.
* a block 0 with the upload's own token restarts it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

# Response codes as plain numbers (class * 32 + detail), so this module needs no aiocoap import.
BAD_REQUEST = 4 * 32 + 0
CONFLICT = 4 * 32 + 9
REQUEST_ENTITY_INCOMPLETE = 4 * 32 + 8
REQUEST_ENTITY_TOO_LARGE = 4 * 32 + 13
SERVICE_UNAVAILABLE = 5 * 32 + 3

MAX_SZX = 6  # 1024-byte blocks; SZX 7 is reserved (BERT) and not valid over UDP


@dataclass
class Continue:
    num: int
    szx: int


@dataclass
class Complete:
    body: bytes
    num: int
    szx: int
    blocks: int


@dataclass
class Refused:
    code: int
    reason: str
    size1: int | None = None
    max_age: float | None = None


@dataclass
class _Transfer:
    token: bytes
    content_format: int | None
    started: float
    last_seen: float
    buf: bytearray = field(default_factory=bytearray)
    blocks: int = 0
    same_token: bool | None = None  # does the client keep its block-0 token? None: not seen yet


class Block1Assembler:
    """Reassembles Block1 uploads keyed by the caller; every limit answers with a code."""

    def __init__(self, *, max_body: int = 4 << 20, max_held_bytes: int = 64 << 20,
                 expiry: float = 60.0, max_szx: int = MAX_SZX, max_transfers: int = 10_000,
                 restart_grace: float = 5.0, busy_retry_after: float = 2.0,
                 clock=time.monotonic) -> None:
        if not 0 <= max_szx <= MAX_SZX:
            raise ValueError(f"max_szx must be 0..{MAX_SZX} (16..1024-byte blocks), got {max_szx}")
        self.max_body = max_body
        self.max_held_bytes = max_held_bytes
        self.expiry = expiry
        self.max_szx = max_szx
        self.max_transfers = max_transfers
        self.restart_grace = restart_grace
        self.busy_retry_after = busy_retry_after
        self._clock = clock
        # Oldest activity first, so expiry is a walk from the front.
        self._transfers: OrderedDict[Hashable, _Transfer] = OrderedDict()
        self.held_bytes = 0  # bytes in unfinished transfers plus completed bodies not yet released
        self.expired = 0

    def __len__(self) -> int:
        return len(self._transfers)

    def release(self, nbytes: int) -> None:
        """A completed body has been handed on (or failed): stop counting it."""
        self.held_bytes -= nbytes

    def sweep(self, now: float | None = None) -> int:
        """Forget transfers idle for longer than ``expiry``; returns how many went."""
        if now is None:
            now = self._clock()
        gone = 0
        while self._transfers:
            key, tr = next(iter(self._transfers.items()))
            if now - tr.last_seen <= self.expiry:
                break
            self._drop(key)
            gone += 1
        self.expired += gone
        return gone

    def _drop(self, key: Hashable) -> None:
        tr = self._transfers.pop(key, None)
        if tr is not None:
            self.held_bytes -= len(tr.buf)

    def check_size1(self, size1: int | None) -> Refused | None:
        if size1 is not None and size1 > self.max_body:
            return Refused(REQUEST_ENTITY_TOO_LARGE,
                           f"body of {size1} bytes is over the limit of {self.max_body}", self.max_body)
        return None

    def feed(self, key: Hashable, num: int, more: bool, szx: int, payload: bytes, *,
             size1: int | None = None, token: bytes = b"",
             content_format: int | None = None) -> Continue | Complete | Refused:
        now = self._clock()
        transfers = self._transfers
        if transfers and now - next(iter(transfers.values())).last_seen > self.expiry:
            self.sweep(now)  # the oldest is due (the common case, nothing due, costs one look)
        if szx > MAX_SZX:
            self._drop(key)
            return Refused(BAD_REQUEST, "block size exponent 7 (BERT) is not allowed over UDP")
        size = 1 << (szx + 4)
        too_big = self.check_size1(size1)
        if too_big is not None:
            self._drop(key)
            return too_big

        tr = transfers.get(key)
        if tr is not None and tr.same_token and token != tr.token and num > 0:
            # the client keeps its token for all blocks: this block is not of this upload
            return Refused(CONFLICT, "this block's token is not the one of the upload in progress from "
                                     "this endpoint to this path (a newer upload replaced it, or two "
                                     "run at once): send a Request-Tag to run uploads side by side")
        if tr is not None and more and len(payload) == size and tr.buf[num * size:(num + 1) * size] == payload \
                and (num > 0 or token == tr.token or not tr.same_token):
            # a block already received, sent again with a new message id (a duplicate older than
            # the exchange cache): answer as before, append nothing, go on
            tr.last_seen = now
            return Continue(num, min(szx, self.max_szx))
        if num == 0:
            inherited = None
            if tr is not None:
                # Same token (a device restarting its upload), a same-token client's new upload
                # (the old one was given up), or a stale transfer: start over. Otherwise a second
                # upload from the same endpoint to the same path may be running and its blocks
                # would interleave with this one: refuse it rather than mix bodies.
                if tr.token == token or tr.same_token or now - tr.last_seen > self.restart_grace:
                    inherited = tr.same_token  # the same client: its late blocks are recognised
                    self._drop(key)
                else:
                    return Refused(CONFLICT, "another Block1 upload from this endpoint to this path "
                                             "is in progress; wait for it or send a Request-Tag")
            if len(self._transfers) >= self.max_transfers:
                return Refused(SERVICE_UNAVAILABLE, "too many uploads in progress",
                               max_age=self.busy_retry_after)
            tr = _Transfer(token, content_format, now, now)
            if inherited and token != b"":
                tr.same_token = True
            self._transfers[key] = tr
        else:
            if tr is None:
                return Refused(REQUEST_ENTITY_INCOMPLETE,
                               f"no upload in progress for block {num} (expired or never started); "
                               "start again at block 0")
            offset = num * size
            if offset != len(tr.buf):
                self._drop(key)
                return Refused(REQUEST_ENTITY_INCOMPLETE,
                               f"block {num} starts at byte {offset} but {len(tr.buf)} bytes were "
                               "received: blocks missing or out of order; start again at block 0")
            if content_format != tr.content_format:
                self._drop(key)
                return Refused(REQUEST_ENTITY_INCOMPLETE,
                               "Content-Format changed in the middle of an upload; start again")
            if tr.same_token is None:
                tr.same_token = token == tr.token

        if more and len(payload) != size:
            self._drop(key)
            return Refused(BAD_REQUEST, f"block {num} has {len(payload)} bytes but every block except "
                                        f"the last must have exactly {size}")
        if not more and len(payload) > size:
            self._drop(key)
            return Refused(BAD_REQUEST,
                           f"last block {num} has {len(payload)} bytes, more than its size {size}")
        total = len(tr.buf) + len(payload)
        if total > self.max_body:
            self._drop(key)
            return Refused(REQUEST_ENTITY_TOO_LARGE,
                           f"body is over the limit of {self.max_body} bytes", self.max_body)
        if self.held_bytes + len(payload) > self.max_held_bytes:
            self._drop(key)
            return Refused(SERVICE_UNAVAILABLE, "too much upload data held; try again later",
                           max_age=self.busy_retry_after)

        tr.buf += payload
        tr.blocks += 1
        tr.last_seen = now
        self.held_bytes += len(payload)
        self._transfers.move_to_end(key)
        if more:
            return Continue(num, min(szx, self.max_szx))
        self._transfers.pop(key)
        # held_bytes keeps counting the body until the caller releases it.
        return Complete(bytes(tr.buf), num, szx, tr.blocks)
