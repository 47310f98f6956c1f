"""Subcommands of the ``pipeline`` CLI, one module each.

A command module ``pipelines/commands/<name>.py`` defines::

    def add_parser(subparsers) -> None:
        p = subparsers.add_parser("validate", help="check pipeline files")
        p.add_argument(...)
        p.set_defaults(func=run)

    def run(args) -> int:           # the exit code
        ...

``pipelines.cli`` finds every such module (:func:`command_modules`) and adds it; nothing
needs registering by hand. A module that fails to import is skipped with a warning on
stderr, so one broken command never takes the others down.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["command_modules"]


def command_modules(only: str | None = None) -> tuple[list[ModuleType], list[tuple[str, BaseException]]]:
    """The importable command modules (sorted by name) and the ones that failed to import.
    With ``only``, just the module of that name (``mqtt-worker`` → ``mqtt_worker``), if any:
    running one command should not pay for importing every other one."""
    modules: list[ModuleType] = []
    failed: list[tuple[str, BaseException]] = []
    wanted = only.replace("-", "_") if only else None
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or (wanted is not None and info.name != wanted):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:
            failed.append((info.name, exc))
            continue
        if callable(getattr(module, "add_parser", None)):
            modules.append(module)
    return modules, failed
