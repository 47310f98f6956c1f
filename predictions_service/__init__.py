"""A local stand-in for Replicate's predictions API, with a real offline model.

Serve it::

    python -m predictions_service --port 8008 --token r8_local
    pipeline predictions serve --port 8008 --token r8_local

or from Python (the router starts it in-process or as a subprocess)::

    from predictions_service import Settings, create_app, serve, running
    await serve(Settings(tokens=("r8_local",), port=8008))
    async with running(Settings(tokens=("t",), port=0)) as base_url: ...

Then point a Replicate client at it (``REPLICATE_BASE_URL=http://127.0.0.1:8008``) and run
``salesforce/blip:2e1dddc8…4746``. The model is EfficientNet-Lite0 (ImageNet-1k) on onnxruntime;
BLIP-style texts are built from its labels (see ``blip.py``). This package never imports the router
(``pipelines``, ``transformers``, ``destinations``): they talk over HTTP only.
"""

from .app import StartupError, create_app, running, serve
from .settings import Settings

__all__ = ["Settings", "StartupError", "create_app", "running", "serve"]
