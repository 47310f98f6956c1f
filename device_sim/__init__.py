"""Simulated microcontroller cameras that talk to the router only over the wire.

A camera renders frames of a real photo (panned, timestamped, noisy; PNG 320x240 by default),
uploads them over CoAPS with its own PSK identity ``<device-id>@<project-id>`` (or plain CoAP,
or MQTT), observes its result document ``/.d/result`` and measures frame-to-answer latency.
This package never imports the router (``pipelines``, ``transformers``, ``destinations``).

Use::

    from device_sim import CameraConfig, Fleet
    fleet = Fleet.create(3, seed=1, config=CameraConfig(host="127.0.0.1", port=5684, interval=2))
    fleet.write_registry("devices.yaml")          # the router's device registry for this fleet
    async with fleet:
        await asyncio.sleep(20)
    print(fleet.totals())

Modules: ``frames`` (rendering), ``scenes`` (the photos), ``identity`` (ids, keys, registry),
``coap_link`` (one CoAP/CoAPS endpoint), ``mqtt_link`` (MQTT), ``camera``, ``fleet``.
From the shell: ``pipeline sim --devices 3 --seed 1 --registry devices.yaml``.
"""

from device_sim.camera import Camera, CameraConfig, CameraEvent, CameraStats
from device_sim.coap_link import CoapLink, LinkError, RejectedError
from device_sim.fleet import Fleet
from device_sim.frames import Frame, FrameSource
from device_sim.identity import DeviceIdentity, fleet_identities, registry_yaml, write_registry
from device_sim.scenes import SCENE_NAMES, SCENE_SUBJECTS, load_scene

__all__ = [
    "SCENE_NAMES",
    "SCENE_SUBJECTS",
    "Camera",
    "CameraConfig",
    "CameraEvent",
    "CameraStats",
    "CoapLink",
    "DeviceIdentity",
    "Fleet",
    "Frame",
    "FrameSource",
    "LinkError",
    "RejectedError",
    "fleet_identities",
    "load_scene",
    "registry_yaml",
    "write_registry",
]
