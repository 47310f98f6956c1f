"""The console's pages and endpoints, mounted by the HTTP face at ``/console``.

Usage (what ``RouterService`` does)::

    console = Console(router, watcher=watcher, sessions=coap.device_sessions)
    app = create_app(router, extra_routes=[console.mount()])
    ...
    console.close()               # before stopping the HTTP server: ends the event streams

Pages (server-rendered, Jinja2; a little JavaScript in ``static/console.js``):

- ``/console/`` one card per device: last seen, session, latest frame, latest answer and
  its latency, refusals; live through ``/console/events`` (server-sent events);
- ``/console/devices/{project}/{device}``: the card, the state document, newest stream records;
  ``.../frame``: the newest frame's image bytes;
- ``/console/pipelines`` and ``/console/pipelines/{name}``: steps with delivered / queued /
  in flight / retries / dead letters, the books, the YAML as loaded, refused reloads;
- ``/console/dead-letters`` (filters ``pipeline``, ``step``, ``device``, ``replayed``) and
  ``/console/dead-letters/{id}`` (payload redacted as ``pipeline dlq show`` does;
  ``.../payload`` downloads it, ``?exact=1`` the exact bytes with the admin scope);
  ``POST /console/dead-letters/replay`` and ``.../purge`` (admin scope).

Access: every page asks ``pipelines.console.access.check_access`` (read, or admin for
replay, purge and exact bytes). POSTs must come from the console's own pages (``Origin``
or ``Referer`` of this host), so a cookie-holding browser cannot be made to replay from
another site.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pipelines.commands.dlq import _as_text, _redact_bytes, _summary
from pipelines.console.access import auth_enabled, check_access
from pipelines.console.activity import Activity
from pipelines.secrets import redact
from pipelines.store import books_gaps

if TYPE_CHECKING:
    from pipelines.reload import ConfigWatcher
    from pipelines.router import Router

HERE = Path(__file__).parent
PREFIX = "/console"
LIST_LIMIT = 200


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    d = max(0.0, time.time() - t)
    if d < 60:
        return f"{d:.0f} s ago"
    if d < 3600:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else ""


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds is not None else ""


def _hexdump(data: bytes, limit: int = 1024) -> str:
    lines = []
    for off in range(0, min(len(data), limit), 16):
        chunk = data[off:off + 16]
        printable = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {chunk.hex(' '):<47}  {printable}")
    if len(data) > limit:
        lines.append(f"… {len(data) - limit} more bytes (download to see them all)")
    return "\n".join(lines)


class Console:
    def __init__(self, router: Router, *, watcher: ConfigWatcher | None = None,
                 sessions: Callable[[], dict[tuple[str, str], dict[str, Any]]] | None = None) -> None:
        self.router = router
        self.watcher = watcher
        self.sessions = sessions or dict
        self.activity = Activity(router)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(P=PREFIX, ago=_ago, when=_when, ms=_ms)

    def close(self) -> None:
        self.activity.close()

    def mount(self) -> Mount:
        return Mount(PREFIX, routes=[
            Route("/", self.devices_page),
            Route("/cards", self.cards_fragment),
            Route("/events", self.events),
            Route("/devices/{project}/{device}", self.device_page),
            Route("/devices/{project}/{device}/frame", self.frame),
            Route("/pipelines", self.pipelines_page),
            Route("/pipelines/{name}", self.pipeline_page),
            Route("/dead-letters", self.dead_letters_page),
            Route("/dead-letters/replay", self.replay, methods=["POST"]),
            Route("/dead-letters/purge", self.purge, methods=["POST"]),
            Route("/dead-letters/{id:int}", self.dead_letter_page),
            Route("/dead-letters/{id:int}/payload", self.dead_letter_payload),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ])

    # -- helpers ---------------------------------------------------------------------------

    def _page(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        context.setdefault("title", "")
        return self.templates.TemplateResponse(request, template, {
            "reload_problems": self.router.reload_problems, "generation": self.router.generation,
            "login": auth_enabled(request), **context}, status_code=status_code)

    def _card_rows(self) -> list[dict[str, Any]]:
        sessions = self.sessions()
        rows = []
        for card in self.activity.cards():
            s = sessions.get((card.project_id, card.device_id), {})
            rows.append({"card": card, "session": s})
        return rows

    # -- devices ---------------------------------------------------------------------------

    async def devices_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        return self._page(request, "devices.html", title="Devices", rows=self._card_rows())

    async def cards_fragment(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        return self.templates.TemplateResponse(request, "_cards.html", {"rows": self._card_rows()})

    async def events(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied

        async def stream():  # type: ignore[no-untyped-def]
            yield "retry: 2000\n\n"
            async for event in self.activity.events():
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def device_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        p, d = request.path_params["project"], request.path_params["device"]
        doc, version = await self.router.store.get_state(p, d)
        records = await self.router.store.query_stream(project_id=p, device_id=d, limit=50)
        card = self.activity.card(p, d)
        session = self.sessions().get((p, d), {})
        return self._page(request, "device.html", title=f"{d}", project=p, device=d, card=card,
                          session=session, state=redact(json.dumps(doc, indent=2, ensure_ascii=False)),
                          version=version,
                          records=[{**r, "data": redact(json.dumps(r["data"], ensure_ascii=False))}
                                   for r in records])

    async def frame(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        card = self.activity.card(request.path_params["project"], request.path_params["device"])
        if card is None or card.frame is None:
            return Response("no frame from this device yet", status_code=404, media_type="text/plain")
        return Response(card.frame, media_type=card.frame_type,
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 "X-Message-Id": card.frame_id or ""})

    # -- pipelines -------------------------------------------------------------------------

    async def _pipelines(self) -> list[dict[str, Any]]:
        r = self.router
        dead = await r.store.open_dead_letter_counts()
        failed = r.engine.transform_failed if r.engine is not None else {}
        out = []
        for pc in r.pipeline_configs:
            steps = []
            for i, sc in enumerate(pc.steps):
                key = (pc.name, sc.name)
                w = r.delivery.workers.get(key) if r.delivery is not None else None
                steps.append({
                    "n": i + 1, "name": sc.name,
                    "transformer": sc.transformer.type if sc.transformer else None,
                    "destination": sc.destination.type if sc.destination else None,
                    "delivered": w.stats.delivered if w else None,
                    "queued": r.queue_depths.get(key, 0) if w else None,
                    "in_flight": w.stats.in_flight if w else None,
                    "retries": w.stats.retried if w else None,
                    "transform_failures": failed.get(key, 0) if sc.transformer else None,
                    "dead": dead.get(key, 0),
                })
            f = pc.filter
            out.append({"name": pc.name, "enabled": pc.enabled, "source": pc.source,
                        "filter": {"path": getattr(f, "path", None),
                                   "content_type": getattr(f, "content_type", None)},
                        "steps": steps, "dead": sum(s["dead"] for s in steps)})
        return out

    async def _books(self) -> dict[str, Any]:
        b = await self.router.store.counters()
        return {"ingested": b.get("ingested", 0), "routed": b.get("routed", 0),
                "unmatched": b.get("unmatched", 0), "waiting": b.get("inbox", 0),
                "dead_open": b.get("dead_letters_open", 0), "queued": b.get("deliveries_queued", 0),
                "gaps": {k: v for k, v in books_gaps(b).items() if v}}

    async def pipelines_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        if request.query_params.get("format") == "json":
            return JSONResponse({"pipelines": await self._pipelines(), "books": await self._books(),
                                 "generation": self.router.generation})
        return self._page(request, "pipelines.html", title="Pipelines", pipelines=await self._pipelines(),
                          books=await self._books())

    async def pipeline_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        name = request.path_params["name"]
        found = [p for p in await self._pipelines() if p["name"] == name]
        if not found:
            return self._page(request, "missing.html", 404, title="Not found",
                              what=f"no pipeline {name!r} is loaded")
        pipeline = found[0]
        w = self.watcher
        yaml_text = w.loaded.files.get(pipeline["source"]) if w else None
        if yaml_text is None:
            try:
                yaml_text = Path(pipeline["source"]).read_text(encoding="utf-8")
            except OSError:
                yaml_text = "(the file cannot be read)"
        refused = w.refused.files.get(pipeline["source"]) if w and w.problems else None
        return self._page(request, "pipeline.html", title=name, pipeline=pipeline,
                          books=await self._books(), yaml=redact(yaml_text),
                          refused=redact(refused) if refused else None)

    # -- dead letters ----------------------------------------------------------------------

    def _filters(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        return {k: (q.get(k) or None) for k in ("pipeline", "step", "device")} | {
            "replayed": q.get("replayed") == "1"}

    async def dead_letters_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        f = self._filters(request)
        rows = await self.router.store.dead_letters(pipeline=f["pipeline"], step=f["step"],
                                                    device_id=f["device"], include_replayed=f["replayed"],
                                                    limit=LIST_LIMIT)
        letters = [_summary(dl) for dl in rows]
        if request.query_params.get("format") == "json":
            return JSONResponse(letters)
        books = await self._books()
        return self._page(request, "dead_letters.html", title="Dead letters", letters=letters, filters=f,
                          open_count=books["dead_open"], message=request.query_params.get("msg"),
                          limit=LIST_LIMIT)

    async def dead_letter_page(self, request: Request) -> Response:
        if denied := await check_access(request, "read"):
            return denied
        rows = await self.router.store.dead_letters(ids=[request.path_params["id"]], include_replayed=True)
        if not rows:
            return self._page(request, "missing.html", 404, title="Not found",
                              what=f"no dead letter {request.path_params['id']}")
        dl = rows[0]
        payload = dl.message.payload
        shown = _redact_bytes(payload)
        text = _as_text(payload, dl.message.content_type)
        return self._page(request, "dead_letter.html", title=f"Dead letter {dl.id}",
                          dl=_summary(dl), redacted=shown != payload,
                          text=redact(text) if text is not None else None,
                          hexdump=_hexdump(shown) if text is None else None)

    async def dead_letter_payload(self, request: Request) -> Response:
        exact = request.query_params.get("exact") == "1"
        if denied := await check_access(request, "admin" if exact else "read"):
            return denied
        rows = await self.router.store.dead_letters(ids=[request.path_params["id"]], include_replayed=True)
        if not rows:
            return Response("no such dead letter", status_code=404, media_type="text/plain")
        dl = rows[0]
        payload = dl.message.payload if exact else _redact_bytes(dl.message.payload)
        return Response(payload, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="dead-letter-{dl.id}.bin"',
            "X-Payload-Redacted": "false" if exact or payload == dl.message.payload else "true",
            "X-Content-Type-Options": "nosniff"})

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin") or request.headers.get("referer")
        if not origin:
            return False
        u = urlsplit(origin)
        return u.netloc == request.headers.get("host")

    async def _selected(self, request: Request) -> tuple[list[int], str]:
        form = await request.form()
        ids = []
        for v in form.getlist("id"):
            if isinstance(v, str) and v.strip().isdigit():
                ids.append(int(v))
        back = form.get("back")
        back = back if isinstance(back, str) and back.startswith(PREFIX + "/") else f"{PREFIX}/dead-letters"
        return ids, back

    def _back(self, back: str, message: str) -> Response:
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}{urlencode({'msg': message})}", status_code=303)

    async def replay(self, request: Request) -> Response:
        if denied := await check_access(request, "admin"):
            return denied
        if not self._same_origin(request):
            return Response("replay must come from the console's own page", status_code=403,
                            media_type="text/plain")
        ids, back = await self._selected(request)
        done, failed = 0, []
        for i in ids:
            try:
                ok = await self.router.replay_dead_letter(i)
            except LookupError as exc:
                failed.append(f"{i}: {redact(str(exc))}")
                continue
            done += ok
            if not ok:
                failed.append(f"{i}: unknown or already replayed")
        msg = f"replayed {done} of {len(ids)}" + (f" ({'; '.join(failed)})" if failed else "")
        return self._back(back, msg)

    async def purge(self, request: Request) -> Response:
        if denied := await check_access(request, "admin"):
            return denied
        if not self._same_origin(request):
            return Response("purge must come from the console's own page", status_code=403,
                            media_type="text/plain")
        ids, back = await self._selected(request)
        n = await self.router.store.purge_dead_letters(ids) if ids else 0
        if back.rstrip("/").split("/")[-1].isdigit():  # the letter's own page is gone now
            back = f"{PREFIX}/dead-letters"
        return self._back(back, f"purged {n} of {len(ids)}")
