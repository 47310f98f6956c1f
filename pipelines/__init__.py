"""IoT Pipelines: a self-hosted router for device data.

Kept import-light on purpose: ``transformers`` and ``destinations`` import
``pipelines.message`` and ``pipelines.components`` only, never the router.
"""

__version__ = "0.1.0"
