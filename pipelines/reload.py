"""Hot reload: re-read the pipelines (and secrets) on SIGHUP or when their files change.

Usage (what ``RouterService`` does)::

    watcher = ConfigWatcher(router, also_refresh=[coap.registry.refresh])
    watcher.start()                      # polls the files' mtimes about once a second
    ok = await watcher.reload("SIGHUP")  # or on demand
    watcher.problems                     # why the last reload was refused ([] if it was not)
    await watcher.stop()

A reload validates the whole new set first (the same loader as ``pipeline validate``, in a
thread so routing does not pause) and only then swaps it in with ``Router.reload``, between
messages. A refused reload keeps the last good configuration: the log says why (ERROR), the
router counts it (``pipeline_config_reload_failures`` on ``/metrics``) and the console shows
the problems beside the YAML that is still serving. The device registry is watched by the
CoAP ingest itself; ``also_refresh`` lets a SIGHUP re-read it at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import load_pipelines
from pipelines.secrets import SecretSource, redact

if TYPE_CHECKING:
    from pipelines.router import Router

log = logging.getLogger("pipelines.reload")

POLL_INTERVAL = 1.0  # seconds between looks at the files' modification times


@dataclass
class LoadedText:
    """The text of each pipeline file as it was when its set was loaded (for the console)."""
    files: dict[str, str] = field(default_factory=dict)


def _pipeline_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.append(p)  # the directory's own mtime changes when a file is added or removed
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".yml", ".yaml")))
        else:
            out.append(p)
    return out


def _read_texts(paths: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    texts = {}
    for f in _pipeline_files(paths):
        if f.is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                texts[str(f)] = f.read_text(encoding="utf-8")
    return texts


class ConfigWatcher:
    def __init__(self, router: Router, *, interval: float = POLL_INTERVAL,
                 also_refresh: Sequence[Callable[[], object]] = ()) -> None:
        self.router = router
        self.interval = interval
        self.also_refresh = list(also_refresh)
        self.loaded = LoadedText(_read_texts(router.settings.pipelines))
        self.refused = LoadedText()     # the texts of the last refused set
        self.problems: list[str] = []   # why the last reload was refused
        self._stamps = self._stamp()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def _watched(self) -> list[Path]:
        files = _pipeline_files(self.router.settings.pipelines)
        if self.router.settings.secrets_file:
            files.append(Path(self.router.settings.secrets_file))
        return files

    def _stamp(self) -> dict[str, tuple[int, int] | None]:
        out: dict[str, tuple[int, int] | None] = {}
        for f in self._watched():
            try:
                st = f.stat()
                out[str(f)] = (st.st_mtime_ns, st.st_size)
            except OSError:
                out[str(f)] = None
        return out

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="config-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                stamps = self._stamp()
                if stamps != self._stamps:
                    changed = sorted(k for k in set(stamps) | set(self._stamps)
                                     if stamps.get(k) != self._stamps.get(k))
                    await self.reload("changed: " + ", ".join(changed))
            except Exception:
                log.exception("watching the configuration files")

    async def reload(self, why: str) -> bool:
        """Validate the files as they are now and swap them in; False (last good set kept) if
        they have problems."""
        from pipelines.router import ConfigError

        async with self._lock:
            self._stamps = self._stamp()
            for refresh in self.also_refresh:
                try:
                    refresh()
                except Exception as exc:  # the registry keeps its last good contents
                    log.error("reload (%s): the device registry was not re-read: %s", why, redact(str(exc)))
            settings = self.router.settings
            paths = list(settings.pipelines)
            texts = await asyncio.to_thread(_read_texts, paths)

            def load():  # type: ignore[no-untyped-def]
                secrets = SecretSource.from_sources(Path(settings.secrets_file) if settings.secrets_file else None)
                return load_pipelines(paths, secrets)

            try:
                loaded = await asyncio.to_thread(load)
                await self.router.reload(loaded)
            except ConfigError as exc:
                self._refuse(why, [redact(str(p)) for p in exc.problems], texts)
                return False
            except Exception as exc:  # e.g. an unreadable secrets file
                self._refuse(why, [redact(f"{type(exc).__name__}: {exc}")], texts)
                return False
            self.loaded = LoadedText(texts)
            self.refused = LoadedText()
            self.problems = []
            self.router.reload_problems = []
            log.warning("configuration reloaded (%s): generation %d, pipelines %s", why,
                        self.router.generation, ", ".join(p.name for p in loaded.pipelines) or "(none)")
            return True

    def _refuse(self, why: str, problems: list[str], texts: dict[str, str]) -> None:
        self.router.reload_failures += 1
        self.router.reload_problems = problems
        self.problems = problems
        self.refused = LoadedText(texts)
        log.error("reload refused (%s); generation %d keeps serving:\n  %s", why, self.router.generation,
                  "\n  ".join(problems))
