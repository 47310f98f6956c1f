"""The Files API routes, as Replicate documents them (``replicate.files.*`` in the official client).

    POST   /v1/files                 multipart: content (required), filename, type, metadata (JSON)
    GET    /v1/files[?cursor=]       {next, previous, results}, newest first, 100 a page
    GET    /v1/files/{id}            the file object
    DELETE /v1/files/{id}            204
    GET    /v1/files/{id}/download   the bytes (with the API token, or with urls.download's signature)

    routes = files_routes(service)   # starlette Routes; ``service`` is app.Service

The multipart body is counted as it streams (``read_capped``) and parsed by starlette's parser,
which needs ``python-multipart``; the upload is then copied into the store, hashed on the way,
off the event loop. A prediction's input may name ``urls.get`` of a file: the runner reads it
from disk (no HTTP round trip).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from typing import TYPE_CHECKING

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from .body import read_capped
from .files import FileRecord, FileTooLarge, StorageFull
from .problems import NOT_FOUND, ApiProblem, InputInvalid
from .records import BadCursor, decode_cursor, encode_cursor

if TYPE_CHECKING:
    from .app import Service

MULTIPART_OVERHEAD = 256 << 10  # boundaries, part headers, filename and metadata fields


def _json(data: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json", headers=headers)


def files_routes(svc: Service) -> list[Route]:
    store = svc.runner.files

    def file_json(request: Request, rec: FileRecord) -> dict:
        base = svc.base_url(request)
        return rec.as_json(base, f"{base}/v1/files/{rec.id}/download?{store.download_query(rec)}")

    def find(request: Request, headers: dict) -> FileRecord:
        rec = store.get(request.state.owner, request.path_params["id"])
        if rec is None:
            raise ApiProblem(404, NOT_FOUND, headers=headers)
        return rec

    async def create(request: Request) -> Response:
        headers = await svc.guard(request, creates=False)
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise InputInvalid([("content", "required", "send the file as multipart/form-data with a content part")])
        cap = store.max_file_bytes + MULTIPART_OVERHEAD
        hint = f"Files must be less than {store.max_file_bytes} bytes in size"
        parser = MultiPartParser(request.headers, read_capped(request, cap, hint), max_files=1, max_fields=8,
                                 max_part_size=MULTIPART_OVERHEAD)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InputInvalid([("content", "format", f"malformed multipart body: {exc.message}")]) from exc
        try:
            content = form.get("content")
            if not isinstance(content, UploadFile):
                raise InputInvalid([("content", "required", "content is required (a file part)")])
            metadata: object = {}
            if isinstance(raw := form.get("metadata"), str) and raw.strip():
                try:
                    metadata = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InputInvalid([("metadata", "format", f"metadata is not valid JSON: {exc}")]) from exc
                if not isinstance(metadata, dict):
                    raise InputInvalid([("metadata", "invalid_type", "Invalid type. Expected: object")])
            name = form.get("filename") if isinstance(form.get("filename"), str) else None
            name = name or content.filename or "file"
            if len(name.encode()) > 255:
                raise InputInvalid([("filename", "max_length", "filename must be at most 255 bytes")])
            ctype = form.get("type") if isinstance(form.get("type"), str) else None
            ctype = ctype or content.content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
            content.file.seek(0)
            try:
                written = await asyncio.to_thread(store.copy_in, content.file)
                rec = store.register(request.state.owner, name, ctype, metadata, written)
            except FileTooLarge as exc:
                raise ApiProblem(413, str(exc), title="Request Entity Too Large", headers=headers) from exc
            except StorageFull as exc:
                raise ApiProblem(507, str(exc), title="Insufficient Storage", headers=headers) from exc
        finally:
            await form.close()
        location = f"{svc.base_url(request)}/v1/files/{rec.id}"
        return _json(file_json(request, rec), 201, {**headers, "location": location})

    async def list_files(request: Request) -> Response:
        headers = await svc.guard(request, creates=False)
        cursor = request.query_params.get("cursor")
        try:
            below = decode_cursor(cursor) if cursor else None
        except BadCursor as exc:
            raise InputInvalid([("cursor", "format", str(exc))]) from exc
        page, nxt = store.page(request.state.owner, below)
        return _json(
            {
                "previous": None,
                "next": f"{svc.base_url(request)}/v1/files?cursor={encode_cursor(nxt)}" if nxt else None,
                "results": [file_json(request, rec) for rec in page],
            },
            headers=headers,
        )

    async def get_file(request: Request) -> Response:
        headers = await svc.guard(request, creates=False)
        return _json(file_json(request, find(request, headers)), headers=headers)

    async def delete_file(request: Request) -> Response:
        headers = await svc.guard(request, creates=False)
        if not store.delete(request.state.owner, request.path_params["id"]):
            raise ApiProblem(404, NOT_FOUND, headers=headers)
        return Response(status_code=204, headers=headers)

    async def download(request: Request) -> Response:
        q = request.query_params
        file_id = request.path_params["id"]
        if "signature" in q:  # a signed URL needs no token, as Replicate's download URLs
            if not store.signed_ok(file_id, q.get("expiry"), q.get("signature")):
                raise ApiProblem(403, "The download URL's signature is invalid or has expired", title="Forbidden")
            store.sweep()
            rec = store.items.get(file_id)
            if rec is None:
                raise ApiProblem(404, NOT_FOUND)
            headers: dict = {}
        else:
            headers = await svc.guard(request, creates=False)
            rec = find(request, headers)
        return FileResponse(rec.path, media_type=rec.content_type, headers={**headers, "etag": f'"{rec.md5}"'})

    return [
        Route("/v1/files", create, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{id}", get_file, methods=["GET"]),
        Route("/v1/files/{id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{id}/download", download, methods=["GET"]),
    ]
