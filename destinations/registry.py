"""The destination registry. ``registry.resolve("webhook", "v1")`` gives the class.

Importing this module imports every built-in destination module (each registers itself
with ``@register``); third-party ones come from the ``iot_pipelines.destinations``
entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipelines.components import Registry

registry = Registry("destination", "iot_pipelines.destinations")
register = registry.register

_CLOUD = "Golioth's cloud-vendor destination; use a webhook or mqtt destination meanwhile"
registry.unsupported.update({
    name: _CLOUD
    for name in (
        "aws-s3", "aws-sqs", "aws-kinesis", "gcp-pubsub", "gcp-cloud-storage", "azure-event-hubs",
        "azure-blob-storage", "kafka", "mongodb", "influxdb", "memfault", "datacake",
    )
})
registry.unsupported["location"] = "it needs Golioth's own cloud location service"


def _import_builtins() -> None:
    import destinations

    for info in pkgutil.iter_modules(destinations.__path__):
        if info.name not in {"registry", "base"} and not info.name.startswith("_"):
            importlib.import_module(f"destinations.{info.name}")


_import_builtins()
