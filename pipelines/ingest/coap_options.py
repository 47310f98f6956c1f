"""The request options the CoAP ingest understands, and the answer to those it does not.

Usage (``_IngestSite`` does this for every request, before any resource sees it)::

    refusal = option_refusal(request.opt)
    if refusal is not None:
        code, reason = refusal        # 4.02 Bad Option or 5.05 Proxying Not Supported

RFC 7252 §5.4.1: an unrecognised *critical* option (odd number) in a request gets 4.02 Bad
Option; §5.4.5: a non-repeatable option given more than once is treated as unrecognised from
its second occurrence (so a repeated Block1, Block2, Uri-Host, ... gets 4.02); §5.7.2: a server
that is no proxy answers Proxy-Uri / Proxy-Scheme with 5.05. OSCORE (9) and EDHOC (21) are
not supported here and count as unrecognised; Q-Block1/Q-Block2 (19, 31; RFC 9177) too.

aiocoap does none of this for a server's resources (it hands every option through): this is
where it is done, once per request, looking at the option numbers only.
"""

from __future__ import annotations

from typing import Any

# Critical options the router acts on (or may safely ignore, like Uri-Host and Uri-Port).
UNDERSTOOD_CRITICAL = frozenset({
    1,    # If-Match
    3,    # Uri-Host
    5,    # If-None-Match
    7,    # Uri-Port
    11,   # Uri-Path
    13,   # Uri-Path-Abbrev (aiocoap's Site maps it, or answers 4.02)
    15,   # Uri-Query
    17,   # Accept
    23,   # Block2
    27,   # Block1
})
PROXY_OPTIONS = frozenset({35, 39})  # Proxy-Uri, Proxy-Scheme
# Critical options that may appear once only (RFC 7252 Table 4, RFC 7959).
NOT_REPEATABLE = frozenset({3, 5, 7, 13, 17, 23, 27})

BAD_OPTION = 4 * 32 + 2
PROXYING_NOT_SUPPORTED = 5 * 32 + 5


def option_refusal(opt: Any) -> tuple[int, str] | None:
    """(code, reason) if a request with these options must be refused, else None."""
    # Options._options (number -> list of values) is aiocoap's own table: reading its keys is
    # the cheapest way to see every number, known to aiocoap or not (this runs per block).
    table: dict[int, list] = opt._options
    for number, values in table.items():
        if not number & 1:
            continue  # elective: ignored when not understood (RFC 7252 §5.4.1)
        if number in PROXY_OPTIONS:
            return PROXYING_NOT_SUPPORTED, "this server is not a proxy (Proxy-Uri / Proxy-Scheme)"
        if number not in UNDERSTOOD_CRITICAL:
            return BAD_OPTION, f"critical option {int(number)} is not supported"
        if len(values) > 1 and number in NOT_REPEATABLE:
            return BAD_OPTION, f"option {int(number)} given {len(values)} times; it may appear once"
    return None
