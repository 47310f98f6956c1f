"""Requests made from inside another network namespace (``tests/golioth_sdk.py`` runs this
under ``nsenter --net=...``): reads a JSON list of requests on stdin, answers a JSON list.

    [{"http": "http://127.0.0.1:PORT/metrics"}]                      -> {"status": 200, "body": "..."}
    [{"coap": "PUT", "uri": "coap://127.0.0.1:5683/.d/a?d=dev", "json": 1}]  -> {"code": "2.04", ...}
    [{"coap": "PUT", "uri": "...", "cbor": 1}]   [{"coap": "GET", "uri": "..."}]

Plain CoAP with ``?d=`` is how the tests stand in for Golioth's cloud API (which writes a
device's state from outside): it is the router's own ingest, over a real aiocoap client.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

import aiocoap
import cbor2


async def main() -> None:
    requests = json.load(sys.stdin)
    answers = []
    ctx = None
    try:
        for req in requests:
            if "http" in req:
                with urllib.request.urlopen(req["http"], timeout=30) as r:
                    answers.append({"status": r.status, "body": r.read().decode()})
                continue
            if ctx is None:
                ctx = await aiocoap.Context.create_client_context()
            msg = aiocoap.Message(code=getattr(aiocoap, req["coap"]), uri=req["uri"])
            if "json" in req:
                msg.payload = json.dumps(req["json"]).encode()
                msg.opt.content_format = 50
            elif "cbor" in req:
                msg.payload = cbor2.dumps(req["cbor"])
                msg.opt.content_format = 60
            answer = await asyncio.wait_for(ctx.request(msg).response, 30)
            answers.append({"code": str(answer.code).split()[0], "payload": answer.payload.decode(errors="replace")})
    finally:
        if ctx is not None:
            await ctx.shutdown()
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
