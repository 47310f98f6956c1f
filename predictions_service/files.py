"""The Files API's storage: uploads kept on disk, listed newest first, expiring like Replicate's.

    store = FileStore(Path("/var/tmp/files"), max_file_bytes=100 << 20, max_total_bytes=1 << 30)
    rec = await store.add_from(owner, "frame.png", "image/png", {}, readable)   # hashed while copied
    rec = store.add_bytes(owner, "input-image", "image/png", data)             # spilled inputs
    store.get(owner, rec.id); store.page(owner, cursor); store.delete(owner, rec.id)
    rec.as_json(base_url)     # {id, name, content_type, size, etag, checksums, metadata, ..., urls}

What Replicate does, and so this: a file object is ``{id, name, content_type, size, etag,
checksums: {sha256, md5}, metadata, created_at, expires_at, urls: {get}}``; ``expires_at`` is 24 h
after creation; ``urls.get`` (``/v1/files/{id}``) is what goes into a prediction's input; files
over 100 MiB get a 413. The bytes are served at ``/v1/files/{id}/download`` (with the API token, or
with the ``expiry`` and ``signature`` query of ``urls.download``, which needs none).

Files belong to the API token that made them (``owner`` is a digest of it): another token neither
lists nor reads them. The index lives in memory; the directory holds one file per upload, written
0600, and the store deletes what it wrote when closed (a restart forgets files, as it forgets
predictions). A total size cap bounds the disk used; expired files are swept on every call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .ids import _random_chars, rfc3339

COPY_CHUNK = 1 << 20


class FileTooLarge(Exception):
    """The upload is over the per-file cap (``str()`` says so)."""


class StorageFull(Exception):
    """Storing the upload would pass the total cap of the store."""


@dataclass(eq=False)
class FileRecord:
    id: str
    owner: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    metadata: dict
    path: Path
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    seq: int = 0

    def as_json(self, base_url: str, download: str) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "etag": self.md5,  # Replicate's etag is the MD5 hex (the recorded cassette shows so)
            "checksums": {"sha256": self.sha256, "md5": self.md5},
            "metadata": self.metadata,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "urls": {"get": f"{base_url}/v1/files/{self.id}", "download": download},
        }


class FileStore:
    def __init__(
        self,
        directory: Path | None,
        max_file_bytes: int = 100 << 20,
        max_total_bytes: int = 1 << 30,
        ttl_seconds: float = 86400.0,
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="predictions-files-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.ttl = ttl_seconds
        self.items: OrderedDict[str, FileRecord] = OrderedDict()
        self.total_bytes = 0
        self._seq = 0
        self._last_sweep = 0.0
        self._signing_key = secrets.token_bytes(32)

    # -- writing ------------------------------------------------------------------------------
    def _new_path(self) -> tuple[str, Path]:
        file_id = _random_chars(32)
        return file_id, self.directory / file_id

    def copy_in(self, source: BinaryIO) -> tuple[str, Path, int, str, str]:
        """Copy ``source`` into a new file, hashing as it goes (blocking: run it in a thread).
        Returns (id, path, size, sha256, md5); FileTooLarge / StorageFull leave nothing behind."""
        file_id, path = self._new_path()
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(COPY_CHUNK):
                    size += len(chunk)
                    self._check_size(size)
                    sha.update(chunk)
                    md5.update(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return file_id, path, size, sha.hexdigest(), md5.hexdigest()

    def _check_size(self, size: int) -> None:
        if size > self.max_file_bytes:
            raise FileTooLarge(f"Files must be less than {self.max_file_bytes} bytes in size")
        if self.total_bytes + size > self.max_total_bytes:
            raise StorageFull(
                f"The file store is full ({self.max_total_bytes} bytes); delete files or wait for them to expire"
            )

    def write_bytes(self, data: bytes) -> tuple[str, Path, int, str, str]:
        """As ``copy_in`` for bytes in memory (blocking)."""
        self._check_size(len(data))
        file_id, path = self._new_path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return (file_id, path, len(data), hashlib.sha256(data).hexdigest(),
                hashlib.md5(data, usedforsecurity=False).hexdigest())

    def register(self, owner: str, name: str, content_type: str, metadata: dict,
                 written: tuple[str, Path, int, str, str], ttl: float | None = None) -> FileRecord:
        """Index a file written by ``copy_in``/``write_bytes`` (on the event loop)."""
        file_id, path, size, sha256, md5 = written
        if self.total_bytes + size > self.max_total_bytes:  # another upload finished meanwhile
            path.unlink(missing_ok=True)
            raise StorageFull(f"The file store is full ({self.max_total_bytes} bytes)")
        self._seq += 1
        now = time.time()
        rec = FileRecord(file_id, owner, name, content_type, size, sha256, md5, metadata, path,
                         created_at=now, expires_at=now + (self.ttl if ttl is None else ttl), seq=self._seq)
        self.items[file_id] = rec
        self.total_bytes += size
        return rec

    # -- reading ------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> None:
        """Remove expired files (at most about once a second)."""
        now = time.time() if now is None else now
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for rec in [r for r in self.items.values() if r.expires_at <= now]:
            self._remove(rec)

    def get(self, owner: str, file_id: str) -> FileRecord | None:
        self.sweep()
        rec = self.items.get(file_id)
        return rec if rec is not None and rec.owner == owner else None

    def page(self, owner: str, below: int | None, limit: int = 100) -> tuple[list[FileRecord], int | None]:
        """Newest first, ``limit`` at a time; the second value is the cursor for the next page."""
        self.sweep()
        out: list[FileRecord] = []
        for rec in reversed(self.items.values()):
            if rec.owner != owner or (below is not None and rec.seq >= below):
                continue
            if len(out) == limit:
                return out, out[-1].seq
            out.append(rec)
        return out, None

    def delete(self, owner: str, file_id: str) -> bool:
        rec = self.get(owner, file_id)
        if rec is None:
            return False
        self._remove(rec)
        return True

    def _remove(self, rec: FileRecord) -> None:
        self.items.pop(rec.id, None)
        self.total_bytes -= rec.size
        rec.path.unlink(missing_ok=True)

    # -- signed download URLs -----------------------------------------------------------------
    def _signature(self, file_id: str, expiry: int) -> str:
        mac = hmac.new(self._signing_key, f"{file_id} {expiry}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def download_query(self, rec: FileRecord) -> str:
        expiry = int(rec.expires_at)
        return f"expiry={expiry}&signature={self._signature(rec.id, expiry)}"

    def signed_ok(self, file_id: str, expiry: str | None, signature: str | None) -> bool:
        if not expiry or not signature or not expiry.isdigit() or int(expiry) < time.time():
            return False
        return hmac.compare_digest(self._signature(file_id, int(expiry)), signature)

    def close(self) -> None:
        for rec in list(self.items.values()):
            self._remove(rec)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
