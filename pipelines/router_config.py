"""One file for the whole router: ``pipeline serve --config router.yaml``.

Usage::

    config = load_router_config(Path("router.yaml"))
    for problem in config.problems:
        print(problem)                    # "router.yaml:7:9: unknown key 'prot' in 'http'; did you mean 'port'?"
    config.values                         # {"store": "/abs/pipeline-data/store.db", "http_port": 8080, ...}
    is_router_config(Path("router.yaml")) # True; False for a pipeline file (by content)

The file (every key optional; relative paths are relative to the file)::

    store: pipeline-data/store.db
    pipelines: [pipeline.yaml]            # files or directories (a single string works too)
    secrets: secrets.env
    registry: devices.yaml
    http: {host: 127.0.0.1, port: 8080, ingest: false, public_url: null, webhook_secret: $WEBHOOK_SECRET}
    coap: {host: 127.0.0.1, dtls_port: 5684, port: null, workers: 1, rate_limit: 20, rate_burst: 20,
           dtls_cert: null, dtls_key: null}
    limits: {max_queue: 20000, max_inbox: 20000, keep_stream_rows: 1000000, keep_log_rows: 100000,
             keep_unmatched_rows: 10000}         # a keep_* of "all" keeps every row
    overrides: {"https://api.replicate.com": "http://127.0.0.1:8008"}
    log: {level: WARNING, format: text}          # format: text or json
    watch: true                                  # reload when pipeline/secrets files change

``values`` uses the names of ``pipeline serve``'s options (``argparse`` dests), so the command
fills in whatever its flags left at their defaults: every flag overrides the file. Problems
are reported as ``FILE:LINE:COL: message`` by the same YAML-with-positions machinery as the
pipeline files (``pipelines.config``). HTTP API keys are not in this file: they live, hashed,
in the store (``pipeline keys create``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Position, Problem, _describe, _FileContext, _is_null, _value
from pipelines.secrets import MissingSecret, SecretSource, SecretSyntaxError

# top-level keys that only a router configuration has (a pipeline file has filter/steps or a
# 'pipelines:' mapping)
_ROUTER_ONLY = ("store", "http", "coap", "limits", "registry", "secrets", "overrides", "log", "watch")
_TOP = ("version", "store", "pipelines", "secrets", "registry", "http", "coap", "limits", "overrides",
        "log", "watch")


def _port(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        return "a port number from 0 to 65535 (0: any free port)"
    return None


def _positive(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return "a whole number of 1 or more"
    return None


def _rows(v: Any) -> str | None:
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return "a number of rows (0 or more) or 'all'"


def _rate(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
    return None if ok else "requests per second per device (0 or more; 0: no limit)"


def _burst(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 1
    return None if ok else "a number of requests, 1 or more"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _level(v: Any) -> str | None:
    ok = isinstance(v, str) and v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    return None if ok else "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"


def _format(v: Any) -> str | None:
    return None if v in ("text", "json") else "text or json"


# section -> key -> (serve's option dest, check, is a path)
_SECTIONS: dict[str, dict[str, tuple[str, Any, bool]]] = {
    "http": {"host": ("http_host", _text, False), "port": ("http_port", _port, False),
             "ingest": ("http_ingest", _flag, False), "public_url": ("public_url", _text, False),
             "webhook_secret": ("webhook_secret", _text, False)},
    "coap": {"host": ("coap_host", _text, False), "dtls_port": ("coap_dtls_port", _port, False),
             "port": ("coap_port", _port, False), "workers": ("workers", _positive, False),
             "rate_limit": ("rate_limit", _rate, False), "rate_burst": ("rate_burst", _burst, False),
             "dtls_cert": ("dtls_cert", _text, True), "dtls_key": ("dtls_key", _text, True)},
    "limits": {"max_queue": ("max_queue", _positive, False), "max_inbox": ("max_inbox", _positive, False),
               "keep_stream_rows": ("keep_stream_rows", _rows, False),
               "keep_log_rows": ("keep_log_rows", _rows, False),
               "keep_unmatched_rows": ("keep_unmatched_rows", _rows, False)},
    "log": {"level": ("log_level", _level, False), "format": ("log_format", _format, False)},
}
_SCALARS: dict[str, tuple[str, Any, bool]] = {
    "store": ("store", _text, True), "secrets": ("secrets", _text, True),
    "registry": ("registry", _text, True), "watch": ("watch", _flag, False),
}


@dataclass
class RouterConfig:
    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def pipelines(self) -> list[Path]:
        return [Path(p) for p in self.values.get("pipelines", [])]

    @property
    def secrets(self) -> Path | None:
        s = self.values.get("secrets")
        return Path(s) if s else None


def _top_keys(path: Path) -> tuple[set[str], yaml.Node | None]:
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set(), None
    if not isinstance(root, yaml.MappingNode):
        return set(), root
    return {k.value for k, _ in root.value if isinstance(k, yaml.ScalarNode)}, root


def is_router_config(path: Path) -> bool:
    """Whether ``path`` is a router configuration rather than a pipeline file (by its keys;
    a ``pipelines:`` list or string, not mapping, also says so)."""
    if not path.is_file():
        return False
    keys, root = _top_keys(path)
    if keys & {"filter", "steps"}:
        return False
    if keys & set(_ROUTER_ONLY):
        return True
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "pipelines":
                return isinstance(v, yaml.SequenceNode) or (isinstance(v, yaml.ScalarNode) and not _is_null(v))
    return False


def load_router_config(path: Path) -> RouterConfig:
    config = RouterConfig(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        config.problems.append(Problem(Position(file, 1, 1), f"cannot read: {exc}"))
        return config
    ctx = _FileContext(file, config.problems, SecretSource.empty())
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        ctx.add(where, f"YAML syntax error: {exc.problem or exc}")
        return config
    except yaml.YAMLError as exc:
        ctx.add(Position(file, 1, 1), f"YAML syntax error: {exc}")
        return config
    if root is None or _is_null(root):
        ctx.add(Position(file, 1, 1), "file is empty: expected the router's settings (store, pipelines, http, ...)")
        return config
    entries = ctx.mapping(root, "the router configuration", _TOP)
    if entries is None:
        return config
    base = path.parent
    values = config.values

    def check(node: yaml.Node, name: str, dest: str, test: Any, is_path: bool) -> None:
        if _is_null(node):
            return  # null: the command's default
        if not isinstance(node, yaml.ScalarNode):
            ctx.add(node, f"{name} must be {test(None) or 'a value'}, not {_describe(node)}")
            return
        value = _value(node)
        wrong = test(value)
        if wrong:
            ctx.add(node, f"{name} must be {wrong}, not {value!r}")
            return
        values[dest] = str(base / value) if is_path else (float(value) if test in (_rate, _burst) else value)

    if "version" in entries:
        node = entries["version"][1]
        if not (isinstance(node, yaml.ScalarNode) and _value(node) == 1):
            ctx.add(node, "version must be 1 (the only format so far)")
    for key, (dest, test, is_path) in _SCALARS.items():
        if key in entries:
            check(entries[key][1], key, dest, test, is_path)
    if "pipelines" in entries:
        node = entries["pipelines"][1]
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        paths = []
        for item in items:
            value = _value(item) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value.strip():
                ctx.add(item, f"pipelines must be a file or directory or a list of them, not {_describe(item)}")
                continue
            p = base / value
            if not p.exists():
                ctx.add(item, f"pipelines: {value!r} does not exist (relative to {base or '.'})")
                continue
            paths.append(str(p))
        values["pipelines"] = paths
    for section, keys in _SECTIONS.items():
        if section not in entries:
            continue
        sub = ctx.mapping(entries[section][1], f"'{section}'", list(keys))
        for key, (_, value_node) in (sub or {}).items():
            dest, test, is_path = keys[key]
            check(value_node, f"{section}.{key}", dest, test, is_path)
    if "overrides" in entries:
        sub = ctx.mapping(entries["overrides"][1], "'overrides'", None)
        pairs = []
        for key, (key_node, value_node) in (sub or {}).items():
            value = _value(value_node) if isinstance(value_node, yaml.ScalarNode) else None
            if not key.startswith(("http://", "https://")):
                ctx.add(key_node, f"overrides: {key!r} must be a base URL (http:// or https://)")
            elif not isinstance(value, str) or not value.startswith(("http://", "https://")):
                ctx.add(value_node, f"overrides: {key!r} must map to a base URL (http:// or https://)")
            else:
                pairs.append(f"{key}={value}")
        values["override"] = pairs
    for key in ("secrets", "registry"):
        if key in values and not Path(values[key]).is_file():
            ctx.add(entries[key][1], f"{key}: {values[key]!r} does not exist")
    if "webhook_secret" in values:  # "$NAME" from the secrets file or the environment
        node = entries["http"][1]
        where = next((v for k, v in node.value if k.value == "webhook_secret"), node)
        try:
            source = SecretSource.from_sources(Path(values["secrets"]) if "secrets" in values
                                               and Path(values["secrets"]).is_file() else None)
            values["webhook_secret"] = source.resolve(values["webhook_secret"])
        except MissingSecret as exc:
            ctx.add(where, f"http.webhook_secret: secret {exc.name!r} is not set "
                           "(put it in the secrets file or the environment)")
        except SecretSyntaxError as exc:
            ctx.add(where, f"http.webhook_secret: {exc}")
    config.problems.sort(key=lambda p: (p.position.line, p.position.col))
    return config
