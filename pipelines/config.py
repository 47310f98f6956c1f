"""Loading and validating pipeline files (spec §2, §3, §5).

Usage::

    from pipelines.config import load_pipelines

    result = load_pipelines(["pipeline.yaml", "more/"], SecretSource.from_sources(secrets_path))
    for problem in result.problems:
        print(problem)                      # "pipeline.yaml:12:9: unknown transformer type ..."
    if not result.problems:
        for p in result.pipelines:          # PipelineConfig, ready for the engine
            ...

A file is either one Golioth document (``version``/``filter``/``steps``, plus our optional
``enabled``; the pipeline is named after the file's stem) or
``pipelines: {NAME: {enabled, filter, steps}}``. A directory stands for every
``*.yml``/``*.yaml`` file in it (not its subdirectories), in name order. Besides ``name``,
``transformer`` and ``destination``, a step may carry the delivery settings of spec §8:
``retry`` (a ``pipelines.retry.RetryPolicy``), ``timeout`` (seconds, or ``"500ms"``,
``"30s"``, ``"2m"``), ``max_in_flight`` and ``rate`` (per second, or ``"120/min"``).

Nothing here raises for a bad file: every problem found, in every file, is collected as a
``Problem`` with a ``FILE:LINE:COL`` position (YAML nodes keep their marks, and a pydantic
error's location is walked back to the YAML node of that parameter). Secret references
are substituted before parameters are validated; secret values never appear in a problem.

``LoadResult.pipelines`` holds only pipelines that loaded without a problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines import secrets as secrets_module
from pipelines.components import Component, Registry, parse_version_selector
from pipelines.filters import FilterConfig, check_path_pattern
from pipelines.secrets import MissingSecret, SecretSource, SecretSyntaxError

if TYPE_CHECKING:
    from pipelines.retry import RetryPolicy

__all__ = [
    "ComponentRef",
    "LoadResult",
    "PipelineConfig",
    "Position",
    "Problem",
    "StepConfig",
    "load_pipelines",
]

_DOCUMENT_KEYS = ("version", "enabled", "filter", "steps")
_FILE_KEYS = ("version", "pipelines")
_FILTER_KEYS = ("path", "content_type")
_STEP_KEYS = ("name", "transformer", "destination", "retry", "timeout", "max_in_flight", "rate")
_COMPONENT_KEYS = ("type", "version", "parameters")
_RETRY_KEYS = ("max_attempts", "max_elapsed", "retry_on", "drop_on")


@dataclass(frozen=True)
class Position:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class Problem:
    position: Position
    message: str
    pipeline: str | None = None
    step: str | None = None

    def __str__(self) -> str:
        return f"{self.position}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.position.file, "line": self.position.line, "col": self.position.col,
                "message": self.message, "pipeline": self.pipeline, "step": self.step}


@dataclass
class ComponentRef:
    kind: str  # "transformer" | "destination"
    type: str
    version: str | None  # the selector as written (None = newest)
    cls: type[Component]
    params: BaseModel  # validated, secrets substituted
    raw_params: dict[str, Any]  # as written, secret references unresolved
    position: Position  # of the 'transformer:' / 'destination:' key


@dataclass
class StepConfig:
    name: str
    transformer: ComponentRef | None
    destination: ComponentRef | None
    retry: RetryPolicy | None
    timeout: float | None  # seconds
    max_in_flight: int | None
    rate: float | None  # per second
    position: Position


@dataclass
class PipelineConfig:
    name: str
    enabled: bool
    filter: FilterConfig
    steps: list[StepConfig]
    source: str
    position: Position


@dataclass
class LoadResult:
    pipelines: list[PipelineConfig]
    problems: list[Problem]
    secrets: SecretSource

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------
# YAML with positions


# only turns composed nodes into Python values (and flattens ``<<`` merges)
_constructor = yaml.constructor.SafeConstructor()


def _pos(file: str, node: yaml.Node) -> Position:
    mark = node.start_mark
    return Position(file, mark.line + 1, mark.column + 1)


def _value(node: yaml.Node) -> Any:
    """The plain Python value of ``node`` (mappings and lists recursively)."""
    if isinstance(node, yaml.MappingNode):
        _constructor.flatten_mapping(node)
        return {_value(k): _value(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_value(v) for v in node.value]
    try:
        return _constructor.construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError):
        # an unknown tag (!!binary, !custom) or an impossible date: keep the text as written
        return node.value
    finally:
        _constructor.constructed_objects.clear()  # no cache across files: it would only grow


# Aliases let a small file stand for a huge (or endless) tree; we walk trees, so refuse those.
MAX_EXPANDED_NODES = 200_000


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int | None:
    """How many nodes ``node`` stands for once aliases are expanded; None if it contains itself."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        return None
    if isinstance(node, yaml.ScalarNode):
        return 1
    active.add(key)
    total = 1
    children = (c for pair in node.value for c in pair) if isinstance(node, yaml.MappingNode) else node.value
    for child in children:
        size = _expanded_size(child, memo, active)
        if size is None:
            return None
        total += size
        if total > MAX_EXPANDED_NODES:
            break
    active.discard(key)
    memo[key] = total
    return total


def _is_null(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null")


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "nothing"
    value = _value(node)
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__)


class _FileContext:
    """Problems found in one file, with the pipeline/step being looked at."""

    def __init__(self, file: str, problems: list[Problem], secrets: SecretSource) -> None:
        self.file = file
        self.problems = problems
        self.secrets = secrets

    def pos(self, node: yaml.Node) -> Position:
        return _pos(self.file, node)

    def add(self, where: yaml.Node | Position, message: str, pipeline: str | None = None,
            step: str | None = None) -> None:
        position = where if isinstance(where, Position) else self.pos(where)
        # secrets never leave through a problem, whatever a validator chose to echo
        message = secrets_module.redact(self.secrets.redact(message))
        self.problems.append(Problem(position, message, pipeline, step))

    def mapping(self, node: yaml.Node, what: str, allowed: Sequence[str] | None,
                pipeline: str | None = None, step: str | None = None,
                ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """``node``'s entries by key, reporting non-mappings, odd and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.add(node, f"{what} must be a mapping, not {_describe(node)}", pipeline, step)
            return None
        _constructor.flatten_mapping(node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = _value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.add(key_node, f"keys in {what} must be strings, not {_describe(key_node)}",
                         pipeline, step)
                continue
            if key in out:
                first = self.pos(out[key][0])
                self.add(key_node, f"duplicate key {key!r} in {what} (first at line {first.line})",
                         pipeline, step)
                continue
            if allowed is not None and key not in allowed:
                self.add(key_node, f"unknown key {key!r} in {what}{_suggest(key, allowed)} "
                                   f"(allowed: {', '.join(allowed)})", pipeline, step)
                continue
            out[key] = (key_node, value_node)
        return out


# ---------------------------------------------------------------------------------------
# Registries (imported lazily: they import every component module)


def _registries(problems: list[Problem], file: str) -> dict[str, Registry] | None:
    try:
        from destinations.registry import registry as destination_registry
        from transformers.registry import registry as transformer_registry
    except Exception as exc:  # a broken component module must not become a traceback
        problems.append(Problem(Position(file, 1, 1),
                                f"cannot load the component registries: {type(exc).__name__}: {exc}"))
        return None
    return {"transformer": transformer_registry, "destination": destination_registry}


# ---------------------------------------------------------------------------------------
# Durations and rates (the optional per-step delivery settings, spec §8)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*$")
_RATE_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0,
               "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def _positive_number(value: Any, pattern: re.Pattern[str], units: dict[Any, float],
                     divide: bool) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and (m := pattern.match(value)):
        factor = units[m.group(2)]
        number = float(m.group(1)) / factor if divide else float(m.group(1)) * factor
    else:
        return None
    return number if number > 0 and number != float("inf") else None


def parse_duration(value: Any) -> float | None:
    """Seconds from ``30``, ``2.5``, ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"``; None if invalid."""
    return _positive_number(value, _DURATION_RE, _DURATION_UNITS, divide=False)


def parse_rate(value: Any) -> float | None:
    """Per second from ``5``, ``"5/s"``, ``"120/min"``, ``"3600/h"``; None if invalid."""
    return _positive_number(value, _RATE_RE, _RATE_UNITS, divide=True)


# ---------------------------------------------------------------------------------------
# The loader


class _Loader:
    def __init__(self, secrets: SecretSource) -> None:
        self.secrets = secrets
        self.problems: list[Problem] = []
        self.pipelines: list[PipelineConfig] = []
        self._seen_pipelines: dict[str, Position] = {}
        self._registries: dict[str, Registry] | None = None
        self._registry_failed = False

    # -- files ---------------------------------------------------------------------------

    def load_path(self, path: Path) -> None:
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in (".yml", ".yaml"))
            if not files:
                self.problems.append(Problem(Position(str(path), 1, 1),
                                             "directory holds no *.yml or *.yaml pipeline files"))
            for file in files:
                self._load_file_sorted(file)
        elif path.exists():
            self._load_file_sorted(path)
        else:
            self.problems.append(Problem(Position(str(path), 1, 1), "no such file or directory"))

    def _load_file_sorted(self, path: Path) -> None:
        """Load one file; its problems are listed in the order they stand in the file."""
        start = len(self.problems)
        self.load_file(path)
        self.problems[start:] = sorted(self.problems[start:],
                                       key=lambda p: (p.position.line, p.position.col))

    def load_file(self, path: Path) -> None:
        file = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            self.problems.append(Problem(Position(file, 1, 1), f"not UTF-8 text: {exc.reason}"))
            return
        except OSError as exc:
            self.problems.append(Problem(Position(file, 1, 1), f"cannot read: {exc.strerror or exc}"))
            return
        ctx = _FileContext(file, self.problems, self.secrets)
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
            detail = exc.problem or "invalid YAML"
            if exc.context and exc.problem:
                start = exc.context_mark
                if start is not None and mark is not None and start.line != mark.line:
                    # the real mistake is often where the construct began (an unclosed '{')
                    detail += f" ({exc.context} started at line {start.line + 1}, column {start.column + 1})"
                else:
                    detail += f" ({exc.context})"
            ctx.add(where, f"YAML syntax error: {detail}")
            return
        except yaml.YAMLError as exc:
            ctx.add(Position(file, 1, 1), f"YAML syntax error: {exc}")
            return
        if root is None or _is_null(root):
            ctx.add(Position(file, 1, 1), "file is empty: expected a pipeline document "
                                          "(filter, steps) or a 'pipelines:' mapping")
            return
        if not isinstance(root, yaml.MappingNode):
            ctx.add(root, f"expected a pipeline document (filter, steps) or a 'pipelines:' "
                          f"mapping, not {_describe(root)}")
            return

        try:
            size = _expanded_size(root, {}, set())
        except RecursionError:
            size = None
        if size is None or size > MAX_EXPANDED_NODES:
            ctx.add(Position(file, 1, 1), "the document refers to itself or expands to too many "
                                          f"nodes through YAML aliases (limit {MAX_EXPANDED_NODES})")
            return

        keys = {k.value for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
        try:
            if "pipelines" in keys:
                self._load_many(ctx, root)
            else:
                self._load_pipeline(ctx, path.stem, root, Position(file, 1, 1), top_level=True)
        except Exception as exc:  # a bug of ours or a component's: still a problem, not a traceback
            ctx.add(Position(file, 1, 1), f"cannot load this file: {type(exc).__name__}: {exc}")

    def _load_many(self, ctx: _FileContext, root: yaml.MappingNode) -> None:
        entries = ctx.mapping(root, "the pipelines file", _FILE_KEYS)
        if entries is None:
            return
        if "version" in entries:
            self._check_format_version(ctx, entries["version"][1])
        pipelines_node = entries.get("pipelines", (None, None))[1]
        if pipelines_node is None:
            return
        if _is_null(pipelines_node) or (isinstance(pipelines_node, yaml.MappingNode)
                                        and not pipelines_node.value):
            ctx.add(pipelines_node, "'pipelines' is empty: give at least one NAME: {steps: ...}")
            return
        named = ctx.mapping(pipelines_node, "'pipelines'", None)
        for name, (key_node, body) in (named or {}).items():
            self._load_pipeline(ctx, name, body, ctx.pos(key_node), top_level=False)

    def _check_format_version(self, ctx: _FileContext, node: yaml.Node, pipeline: str | None = None) -> bool:
        value = _value(node) if isinstance(node, yaml.ScalarNode) else None
        if value != "v1":
            ctx.add(node, f"unsupported pipeline format version {value!r}: only 'v1' exists", pipeline)
            return False
        return True

    # -- one pipeline ----------------------------------------------------------------------

    def _load_pipeline(self, ctx: _FileContext, name: str, node: yaml.Node, position: Position,
                       top_level: bool) -> None:
        before = len(self.problems)
        what = "the pipeline document" if top_level else f"pipeline {name!r}"
        entries = ctx.mapping(node, what, _DOCUMENT_KEYS, pipeline=name)
        if entries is None:
            return

        if "version" in entries:
            self._check_format_version(ctx, entries["version"][1], name)

        enabled = True
        if "enabled" in entries:
            enabled_node = entries["enabled"][1]
            value = _value(enabled_node) if isinstance(enabled_node, yaml.ScalarNode) else None
            if isinstance(value, bool):
                enabled = value
            else:
                ctx.add(enabled_node, f"'enabled' must be true or false, not {_describe(enabled_node)}",
                        name)

        filter_config = self._load_filter(ctx, name, entries.get("filter", (None, None))[1])

        steps: list[StepConfig] = []
        if "steps" not in entries:
            ctx.add(node, f"pipeline {name!r} has no 'steps' (a list of named steps is required)", name)
        else:
            steps_node = entries["steps"][1]
            if not isinstance(steps_node, yaml.SequenceNode):
                ctx.add(steps_node, f"'steps' must be a list of steps, not {_describe(steps_node)}", name)
            elif not steps_node.value:
                ctx.add(steps_node, f"pipeline {name!r} has no steps: 'steps' is an empty list", name)
            else:
                seen: dict[str, Position] = {}
                for index, step_node in enumerate(steps_node.value):
                    step = self._load_step(ctx, name, index, step_node, seen)
                    if step is not None:
                        steps.append(step)

        if name in self._seen_pipelines:
            first = self._seen_pipelines[name]
            ctx.add(position, f"duplicate pipeline name {name!r} (first defined at {first})", name)
        else:
            self._seen_pipelines[name] = position

        if len(self.problems) == before and filter_config is not None:
            self.pipelines.append(PipelineConfig(name=name, enabled=enabled, filter=filter_config,
                                                 steps=steps, source=ctx.file, position=position))

    def _load_filter(self, ctx: _FileContext, pipeline: str, node: yaml.Node | None) -> FilterConfig | None:
        if _is_null(node):
            return FilterConfig()
        assert node is not None
        entries = ctx.mapping(node, "'filter'", _FILTER_KEYS, pipeline=pipeline)
        if entries is None:
            return None
        values: dict[str, str | None] = {}
        ok = True
        for key in _FILTER_KEYS:
            if key not in entries:
                values[key] = None
                continue
            value_node = entries[key][1]
            value = _value(value_node) if isinstance(value_node, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                ctx.add(value_node, f"filter {key} must be a non-empty string, not "
                                    f"{_describe(value_node)}", pipeline)
                ok = False
                continue
            if key == "path" and (problem := check_path_pattern(value)):
                # point at the offending '*' when the scalar is on one line
                where = ctx.pos(value_node)
                if value_node.start_mark.line == value_node.end_mark.line:
                    offset = 1 if value_node.style in ("'", '"') else 0
                    where = Position(where.file, where.line, where.col + offset + value.index("*"))
                ctx.add(where, problem, pipeline)
                ok = False
                continue
            values[key] = value
        return FilterConfig(path=values["path"], content_type=values["content_type"]) if ok else None

    # -- one step ------------------------------------------------------------------------------

    def _load_step(self, ctx: _FileContext, pipeline: str, index: int, node: yaml.Node,
                   seen: dict[str, Position]) -> StepConfig | None:
        label = f"step {index + 1}"
        if isinstance(node, yaml.MappingNode):  # name the step in problems about its own keys
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == "name" and isinstance(v, yaml.ScalarNode):
                    label = f"step {v.value!r}"
        entries = ctx.mapping(node, label, _STEP_KEYS, pipeline=pipeline)
        if entries is None:
            return None

        name: str | None = None
        if "name" not in entries:
            ctx.add(node, f"{label} has no 'name' (every step needs a name, unique in its pipeline)",
                    pipeline)
        else:
            name_node = entries["name"][1]
            value = _value(name_node) if isinstance(name_node, yaml.ScalarNode) else None
            if isinstance(value, str) and value:
                name = value
                if name in seen:
                    ctx.add(name_node, f"duplicate step name {name!r} in pipeline {pipeline!r} "
                                       f"(first at line {seen[name].line})", pipeline, name)
                else:
                    seen[name] = ctx.pos(name_node)
            else:
                ctx.add(name_node, f"step name must be a non-empty string, not {_describe(name_node)}",
                        pipeline)
        step_name = name or label

        if "transformer" not in entries and "destination" not in entries:
            ctx.add(node, f"step {step_name!r} has neither a 'transformer' nor a 'destination'",
                    pipeline, name)

        refs: dict[str, ComponentRef | None] = {"transformer": None, "destination": None}
        for kind in ("transformer", "destination"):
            if kind in entries:
                key_node, value_node = entries[kind]
                refs[kind] = self._load_component(ctx, kind, value_node, ctx.pos(key_node), pipeline,
                                                  step_name)

        timeout = max_in_flight = rate = retry = None
        if "timeout" in entries:
            timeout_node = entries["timeout"][1]
            timeout = parse_duration(_value(timeout_node))
            if timeout is None:
                ctx.add(timeout_node, f"step {step_name!r}: 'timeout' must be a positive number of "
                                      f"seconds (or e.g. '500ms', '30s', '2m')", pipeline, name)
        if "max_in_flight" in entries:
            mif_node = entries["max_in_flight"][1]
            value = _value(mif_node)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                max_in_flight = value
            else:
                ctx.add(mif_node, f"step {step_name!r}: 'max_in_flight' must be a whole number "
                                  f"of at least 1", pipeline, name)
        if "rate" in entries:
            rate_node = entries["rate"][1]
            rate = parse_rate(_value(rate_node))
            if rate is None:
                ctx.add(rate_node, f"step {step_name!r}: 'rate' must be a positive number per "
                                   f"second (or e.g. '5/s', '120/min')", pipeline, name)
        if "retry" in entries:
            retry = self._load_retry(ctx, entries["retry"][1], pipeline, step_name)

        return StepConfig(name=step_name, transformer=refs["transformer"],
                          destination=refs["destination"], retry=retry, timeout=timeout,
                          max_in_flight=max_in_flight, rate=rate, position=ctx.pos(node))

    def _load_retry(self, ctx: _FileContext, node: yaml.Node, pipeline: str, step: str) -> Any:
        try:
            from pipelines.retry import RetryPolicy
        except ImportError:  # pragma: no cover - the retry module ships with the router
            RetryPolicy = None
        allowed = tuple(RetryPolicy.model_fields) if RetryPolicy is not None else _RETRY_KEYS
        entries = ctx.mapping(node, f"step {step!r} 'retry'", allowed, pipeline, step)
        if entries is None:
            return None
        raw = {key: _value(value_node) for key, (_, value_node) in entries.items()}
        if RetryPolicy is None:
            return raw
        try:
            return RetryPolicy.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors():
                loc = tuple(error.get("loc", ()))
                target, _, _ = _locate(node, loc)
                label = f" {_dotted(loc)}" if loc else ""
                ctx.add(target, f"step {step!r} 'retry'{label}: {error.get('msg', 'invalid value')}",
                        pipeline, step)
            return None

    # -- one component ----------------------------------------------------------------------

    def _registry(self, ctx: _FileContext, kind: str) -> Registry | None:
        if self._registries is None and not self._registry_failed:
            self._registries = _registries(self.problems, ctx.file)
            self._registry_failed = self._registries is None
        return None if self._registries is None else self._registries[kind]

    def _load_component(self, ctx: _FileContext, kind: str, node: yaml.Node, position: Position,
                        pipeline: str, step: str) -> ComponentRef | None:
        where_step = f"step {step!r}"
        entries = ctx.mapping(node, f"{where_step} {kind}", _COMPONENT_KEYS, pipeline, step)
        if entries is None:
            return None
        registry = self._registry(ctx, kind)
        if registry is None:
            return None

        if "type" not in entries:
            ctx.add(node, f"{where_step}: {kind} has no 'type'", pipeline, step)
            return None
        type_node = entries["type"][1]
        type_name = _value(type_node) if isinstance(type_node, yaml.ScalarNode) else None
        if not isinstance(type_name, str) or not type_name:
            ctx.add(type_node, f"{where_step}: {kind} type must be a string, not {_describe(type_node)}",
                    pipeline, step)
            return None

        selector: str | None = None
        selector_ok = True
        if "version" in entries:
            version_node = entries["version"][1]
            raw_version = _value(version_node) if isinstance(version_node, yaml.ScalarNode) else None
            try:
                if raw_version is None or isinstance(raw_version, bool):
                    raise ValueError(f"version {raw_version!r} is not of the form v1, v1.0 or v1.0.0")
                selector = str(raw_version)
                parse_version_selector(selector)
            except ValueError as exc:
                ctx.add(version_node, f"{where_step}: {kind} {type_name!r}: {exc}", pipeline, step)
                selector, selector_ok = None, False

        try:
            cls = registry.resolve(type_name, selector)
        except (LookupError, ValueError) as exc:
            message = str(exc)
            if type_name not in registry.names() and type_name not in registry.unsupported:
                message += _suggest(type_name, [*registry.names(), *registry.unsupported])
                other_kind = "destination" if kind == "transformer" else "transformer"
                other = self._registry(ctx, other_kind)
                if other is not None and type_name in other.names():
                    message += f" ({type_name!r} is a {other_kind}: put it under '{other_kind}:')"
            ctx.add(entries["version"][1] if "version" in entries and type_name in registry.names()
                    else type_node, f"{where_step}: {message}", pipeline, step)
            return None

        params_node = entries.get("parameters", (None, None))[1]
        raw_params: dict[str, Any] = {}
        resolved: dict[str, Any] = {}
        secret_locs: list[tuple[Any, ...]] = []
        if not _is_null(params_node):
            assert params_node is not None
            if not isinstance(params_node, yaml.MappingNode):
                ctx.add(params_node, f"{where_step}: {kind} {type_name!r} 'parameters' must be a "
                                     f"mapping, not {_describe(params_node)}", pipeline, step)
                return None
            _constructor.flatten_mapping(params_node)
            raw_params = _value(params_node)
            resolved = self._resolve_secrets(ctx, params_node, (), pipeline, step, secret_locs)

        what = f"{where_step}: {kind} {type_name!r}"
        has_params = params_node is not None and not _is_null(params_node)
        anchor = params_node if has_params else node
        # a missing top-level parameter is reported at 'parameters:' (or at the component's key)
        missing_at = ctx.pos(entries["parameters"][0]) if "parameters" in entries else position
        try:
            params = cls.Params.model_validate(resolved)
        except ValidationError as exc:
            errors = [e for e in exc.errors()
                      # a missing secret is reported once, as such (or skipped with allow_missing)
                      if not any(tuple(e.get("loc", ()))[: len(s)] == s for s in secret_locs)]
            for error in errors:
                loc = tuple(error.get("loc", ()))
                self._parameter_problem(ctx, what, cls, anchor, missing_at, loc, error, pipeline, step)
            if errors or not self.secrets.allow_missing:
                return None
            # only unset secrets stood in the way: unvalidated params, fit for listing, not running
            params = cls.Params.model_construct(**resolved)
        except Exception as exc:  # a validator that raised something odd: still a problem, not a crash
            ctx.add(anchor, f"{what}: invalid parameters: {type(exc).__name__}: {exc}", pipeline, step)
            return None
        if not selector_ok or (secret_locs and not self.secrets.allow_missing):
            return None
        return ComponentRef(kind=kind, type=type_name, version=selector, cls=cls, params=params,
                            raw_params=raw_params, position=position)

    def _resolve_secrets(self, ctx: _FileContext, node: yaml.Node, loc: tuple[Any, ...],
                         pipeline: str, step: str, failed: list[tuple[Any, ...]]) -> Any:
        """``node``'s value with secret references substituted; failures reported at the string."""
        if isinstance(node, yaml.MappingNode):
            _constructor.flatten_mapping(node)
            return {(key := _value(k)): self._resolve_secrets(ctx, v, (*loc, key), pipeline, step, failed)
                    for k, v in node.value}
        if isinstance(node, yaml.SequenceNode):
            return [self._resolve_secrets(ctx, v, (*loc, i), pipeline, step, failed)
                    for i, v in enumerate(node.value)]
        value = _value(node)
        if not isinstance(value, str):
            return value
        try:
            return self.secrets.resolve(value)
        except MissingSecret as exc:
            failed.append(loc)
            if self.secrets.allow_missing:
                return value
            ctx.add(node, f"pipeline {pipeline!r} step {step!r} parameter {_dotted(loc)!r}: secret "
                          f"{exc.name!r} is not set (put it in the secrets file or the environment)",
                    pipeline, step)
        except SecretSyntaxError as exc:
            failed.append(loc)
            ctx.add(node, f"pipeline {pipeline!r} step {step!r} parameter {_dotted(loc)!r}: {exc}",
                    pipeline, step)
        return value

    def _parameter_problem(self, ctx: _FileContext, what: str, cls: type[Component], anchor: yaml.Node,
                           missing_at: Position, loc: tuple[Any, ...], error: Any, pipeline: str,
                           step: str) -> None:
        kind = error.get("type", "")
        target, key_node, found_all = _locate(anchor, loc)
        name = _dotted(loc)
        fields = list(cls.Params.model_fields)
        if kind == "missing":
            ctx.add(missing_at if len(loc) <= 1 else target,
                    f"{what} is missing required parameter {name!r}", pipeline, step)
        elif kind == "extra_forbidden":
            hint = _suggest(str(loc[-1]), fields) if len(loc) == 1 else ""
            known = f" (parameters: {', '.join(fields)})" if len(loc) == 1 and fields else ""
            if len(loc) == 1 and not fields:
                known = " (it takes no parameters)"
            ctx.add(key_node if key_node is not None and found_all else target,
                    f"{what} has no parameter {name!r}{hint}{known}", pipeline, step)
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            if not loc and isinstance(anchor, yaml.MappingNode):
                # a whole-model check: point at the parameter when the model has just one
                present = [(k, v) for k, v in anchor.value
                           if isinstance(k, yaml.ScalarNode) and k.value in fields]
                if len(fields) == 1 and len(present) == 1:
                    name, target = present[0][0].value, present[0][1]
            label = f"parameter {name!r}" if name else "parameters"
            ctx.add(target, f"{what} {label}: {message}", pipeline, step)


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _locate(node: yaml.Node, loc: Sequence[Any]) -> tuple[yaml.Node, yaml.Node | None, bool]:
    """The deepest YAML node along ``loc`` (a pydantic error location), the key node of the
    last step when it was a mapping key, and whether the whole location was found."""
    key_node: yaml.Node | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and (k.value == str(part) or _value(k) == part):
                    key_node, node = k, v
                    break
            else:
                return node, None, False
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            key_node, node = None, node.value[part]
        else:
            return node, None, False
    return node, key_node, True


def load_pipelines(paths: Sequence[str | Path], secrets: SecretSource | None = None) -> LoadResult:
    """Load and check every pipeline in ``paths`` (files or directories). Never raises for
    bad input: problems are collected in the result. ``secrets`` defaults to the
    environment only."""
    if secrets is None:
        secrets = SecretSource.from_sources(None)
    loader = _Loader(secrets)
    if isinstance(paths, str | Path):
        paths = [paths]
    for path in paths:
        loader.load_path(Path(path))
    return LoadResult(pipelines=loader.pipelines, problems=loader.problems, secrets=secrets)
