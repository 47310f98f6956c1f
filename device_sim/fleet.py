"""A fleet of simulated cameras (random keys unless a key seed is given), plus the matching registry file.

Use::

    from device_sim import CameraConfig, Fleet
    fleet = Fleet.create(4, seed=42, project_id="demo", config=CameraConfig(port=5684))
    fleet.write_registry("devices.yaml")       # give this file to the router
    async with fleet:                          # start(); stop() on exit
        await asyncio.sleep(30)
        print(fleet.totals())                  # summed counters
        for camera in fleet.cameras: print(camera.device_id, camera.stats.last_answer)

Starts are staggered over one interval so the cameras do not upload in lock step.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from device_sim.camera import Camera, CameraConfig, EventCallback
from device_sim.identity import DeviceIdentity, fleet_identities, write_registry


class Fleet:
    """Several cameras run together."""

    def __init__(
        self,
        identities: list[DeviceIdentity],
        config: CameraConfig | None = None,
        *,
        seed: int = 0,
        on_event: EventCallback | None = None,
        stagger: bool = True,
    ) -> None:
        if not identities:
            raise ValueError("a fleet needs at least one camera")
        self.identities = identities
        self.config = config or CameraConfig()
        self.config.validate()
        count = len(identities)
        self._on_event = on_event
        self.cameras = [
            Camera(identity, replace(self.config), seed=seed, on_event=on_event,
                   start_delay=self.config.interval * number / count if stagger else 0.0)
            for number, identity in enumerate(identities)
        ]

    @property
    def on_event(self) -> EventCallback | None:
        return self._on_event

    @on_event.setter
    def on_event(self, callback: EventCallback | None) -> None:
        """Set (or clear) the event callback of every camera, also while running."""
        self._on_event = callback
        for camera in self.cameras:
            camera.on_event = callback

    @classmethod
    def create(
        cls,
        count: int,
        *,
        seed: int = 0,
        project_id: str = "demo",
        config: CameraConfig | None = None,
        on_event: EventCallback | None = None,
        stagger: bool = True,
        key_seed: int | None = None,
    ) -> Fleet:
        """Random keys unless ``key_seed`` (see ``device_sim.identity``)."""
        return cls(fleet_identities(count, seed=seed, project_id=project_id, key_seed=key_seed), config,
                   seed=seed, on_event=on_event, stagger=stagger)

    def write_registry(self, path: str | Path) -> Path:
        return write_registry(path, self.identities)

    async def start(self) -> None:
        await asyncio.gather(*(camera.start() for camera in self.cameras))

    async def stop(self) -> None:
        await asyncio.gather(*(camera.stop() for camera in self.cameras))

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def totals(self) -> dict[str, Any]:
        """Counters summed over the fleet, with latency percentiles (seconds) over all samples."""
        keys = ("frames_sent", "frames_acked", "frames_answered", "frames_rejected", "errors",
                "retries", "keepalives", "bytes_sent")
        totals: dict[str, Any] = {key: sum(getattr(c.stats, key) for c in self.cameras) for key in keys}
        latencies = sorted(x for c in self.cameras for x in c.stats.latencies)
        totals["cameras"] = len(self.cameras)
        totals["observing"] = sum(c.stats.observing for c in self.cameras)
        totals["latency_p50"] = statistics.median(latencies) if latencies else None
        totals["latency_p95"] = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
        return totals
