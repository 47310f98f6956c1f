"""``pipeline components [TYPE] [--kind transformer|destination] [--format text|json|markdown]``

Lists and documents every registered transformer and destination from its own class:
type, versions, summary, accepted content types and every parameter of its ``Params``
model (type, required or default, description, examples; nested models such as
``struct-to-json`` members included). With TYPE, only that component. Golioth types that
are recognised but not implemented are listed as such. Exit 1 when TYPE is unknown.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipelines.components import Component, Registry


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("components", help="list and document the transformers and destinations",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("type", nargs="?", metavar="TYPE", help="document only this component type")
    p.add_argument("--kind", choices=("transformer", "destination"), help="only this kind")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text", help="output format")
    p.set_defaults(func=run)


def _registries() -> dict[str, Registry]:
    from destinations.registry import registry as destinations
    from transformers.registry import registry as transformers

    return {"transformer": transformers, "destination": destinations}


def _type_name(annotation: Any) -> str:
    """A short readable type: ``str``, ``list[Member]``, ``dict[str, str] | None``."""
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = typing.get_args(annotation)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for model in _nested_models(arg):
            if model not in found:
                found.append(model)
    return found


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def describe_model(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Every field of ``model``: name, type, required, default, description, examples, fields."""
    fields = []
    for name, info in model.model_fields.items():
        entry: dict[str, Any] = {
            "name": info.alias or name,
            "type": _type_name(info.annotation),
            "required": info.is_required(),
            "description": info.description or "",
        }
        if not info.is_required():
            if info.default is not PydanticUndefined:
                entry["default"] = _jsonable(info.default)
            elif info.default_factory is not None:
                try:
                    entry["default"] = _jsonable(info.default_factory())  # type: ignore[call-arg]
                except Exception:
                    entry["default"] = "(computed)"
        if info.examples:
            entry["examples"] = [_jsonable(e) for e in info.examples]
        nested = _nested_models(info.annotation)
        if nested:
            entry["fields"] = [f for m in nested for f in describe_model(m)]
        fields.append(entry)
    return fields


def describe(kind: str, versions: list[type[Component]]) -> dict[str, Any]:
    newest = versions[-1]
    return {
        "kind": kind,
        "type": newest.type,
        "version": newest.version,
        "versions": [c.version for c in versions],
        "summary": newest.summary,
        "accepts": list(newest.accepts) if newest.accepts is not None else None,
        "parameters": describe_model(newest.Params),
    }


def catalogue(kind: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(documented components, recognised-but-unsupported types) for ``kind`` or both kinds."""
    documented: list[dict[str, Any]] = []
    unsupported: list[dict[str, str]] = []
    for k, registry in _registries().items():
        if kind and k != kind:
            continue
        for name in registry.names():
            documented.append(describe(k, registry._by_type[name]))
        for name, reason in sorted(registry.unsupported.items()):
            if name not in registry.names():
                unsupported.append({"kind": k, "type": name, "reason": reason})
    return documented, unsupported


def _text_field(field: dict[str, Any], indent: str) -> list[str]:
    need = "required" if field["required"] else f"default {json.dumps(field.get('default'))}"
    lines = [f"{indent}{field['name']} ({field['type']}, {need})"]
    if field["description"]:
        lines.append(f"{indent}    {field['description']}")
    if field.get("examples"):
        lines.append(f"{indent}    example: " + ", ".join(json.dumps(e) for e in field["examples"]))
    for sub in field.get("fields", []):
        lines.extend(_text_field(sub, indent + "    "))
    return lines


def _text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['type']}  ({doc['kind']}, v{doc['version']})"]
    if doc["summary"]:
        lines.append(f"    {doc['summary']}")
    if doc["accepts"]:
        accepts = ", ".join("application/json" if a == "json" else a for a in doc["accepts"])
        lines.append(f"    accepts: {accepts}")
    if doc["parameters"]:
        lines.append("    parameters:")
        for field in doc["parameters"]:
            lines.extend(_text_field(field, "      "))
    else:
        lines.append("    parameters: none")
    return "\n".join(lines)


def _markdown_field(field: dict[str, Any], prefix: str = "") -> list[str]:
    need = "required" if field["required"] else f"`{json.dumps(field.get('default'))}`"
    examples = ", ".join(f"`{json.dumps(e)}`" for e in field.get("examples", []))
    description = field["description"].replace("|", "\\|")
    rows = [f"| `{prefix}{field['name']}` | `{field['type']}` | {need} | {description} | {examples} |"]
    for sub in field.get("fields", []):
        rows.extend(_markdown_field(sub, f"{prefix}{field['name']}."))
    return rows


def _markdown(doc: dict[str, Any]) -> str:
    lines = [f"### `{doc['type']}` ({doc['kind']}, v{doc['version']})", "", doc["summary"] or "", ""]
    if doc["parameters"]:
        lines += ["| parameter | type | default | description | example |", "|---|---|---|---|---|"]
        for field in doc["parameters"]:
            lines.extend(_markdown_field(field))
    else:
        lines.append("No parameters.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    documented, unsupported = catalogue(args.kind)
    if args.type:
        documented = [d for d in documented if d["type"] == args.type]
        unsupported = [u for u in unsupported if u["type"] == args.type]
        if not documented and not unsupported:
            print(f"pipeline components: unknown component type {args.type!r}", file=sys.stderr)
            return 1
    if args.format == "json":
        print(json.dumps({"components": documented, "unsupported": unsupported}, indent=2))
        return 0
    render = _markdown if args.format == "markdown" else _text
    print("\n\n".join(render(d) for d in documented))
    if unsupported:
        if documented:
            print()
        heading = "Recognised, not supported yet:"
        print(heading if args.format == "text" else f"**{heading}**\n")
        for u in unsupported:
            print(f"  {u['type']} ({u['kind']}): {u['reason']}" if args.format == "text"
                  else f"- `{u['type']}` ({u['kind']}): {u['reason']}")
    return 0
