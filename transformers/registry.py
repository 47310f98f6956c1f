"""The transformer registry. ``registry.resolve("json-patch", "v1")`` gives the class.

Importing this module imports every built-in transformer module (each registers itself
with ``@register``); third-party ones come from the ``iot_pipelines.transformers``
entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipelines.components import Registry

registry = Registry("transformer", "iot_pipelines.transformers")
register = registry.register

registry.unsupported.update({
    "location": "it needs Golioth's own cloud location service",
})


def _import_builtins() -> None:
    import transformers

    for info in pkgutil.iter_modules(transformers.__path__):
        if info.name not in {"registry", "base"} and not info.name.startswith("_"):
            importlib.import_module(f"transformers.{info.name}")


_import_builtins()
