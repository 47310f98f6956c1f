"""The router's web console: devices with their frames and answers, pipelines with their
counters and YAML, dead letters with replay and purge, state and stream, served by the HTTP
face at ``/console``.

Usage::

    from pipelines.console import Console
    console = Console(router, watcher=watcher, sessions=coap.device_sessions)
    app = create_app(router, extra_routes=[console.mount()])

``pipeline serve`` and ``pipeline run`` mount it (``RouterService``); open
``http://127.0.0.1:8080/console/``. Templates and static files live beside this module
(``templates/``, ``static/``): plain HTML rendered on the server, a little JavaScript for the
live parts, no build step. See ``pipelines.console.app`` for the pages and
``pipelines.console.access`` for who may see them.
"""

from pipelines.console.app import Console

__all__ = ["Console"]
