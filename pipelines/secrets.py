"""Secrets for pipeline parameters: where they come from, how they are substituted, and
how their values are kept out of everything we print.

Usage::

    from pipelines.secrets import SecretSource, MissingSecret, redact

    secrets = SecretSource.from_sources(Path("secrets.env"))   # then os.environ
    secrets.resolve("$REPLICATE_TOKEN")           # whole value: the secret itself
    secrets.resolve("Bearer ${REPLICATE_TOKEN}")  # interpolation inside a longer string
    secrets.resolve("costs $$5")                  # "$$" is a literal "$" -> "costs $5"
    secrets.resolve("$NOPE")                      # raises MissingSecret("NOPE")
    redact(f"sent {token}")                       # -> "sent ***" once token was resolved
    install_log_redaction()                       # after logging.basicConfig: logs redacted too

Sources, in order: the secrets file (YAML ``NAME: value`` or ``.env`` lines ``NAME=value``),
then the environment. Names are ``[A-Za-z_][A-Za-z0-9_]*`` and looked up case-insensitively.

A ``$`` that starts neither ``$NAME`` (as the whole value), ``${NAME}`` nor ``$$`` is kept
as written, so URLs and texts with a stray ``$`` keep working.

Every value resolved by any ``SecretSource`` in this process (4 characters or longer;
shorter ones would blank out ordinary text) is remembered by the module-level
:func:`redact`, which the engine, the logs, dead letters and the CLI pass text through.

:func:`redact` finds a secret in every form it travels in, not only as given:
percent-encoded (``quote``, ``quote_plus``, upper- or lower-case hex), JSON-escaped, base64
(standard and URL-safe, padded or not), inside any base64 text (a payload that contains the
secret, shown base64: the stretch of base64 that only the secret's bytes determine is found at
each of the three alignments; secrets of 8+ characters), and in HTTP Basic credentials
(``Basic base64(user:pass)``, e.g. from a URL's userinfo: decoded, and blanked whole when they
hold a secret). :func:`redact_tree` does the same for every string in nested dicts and lists.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import yaml

__all__ = [
    "MIN_REDACT_LENGTH",
    "REDACTED",
    "MissingSecret",
    "RedactingFilter",
    "SecretSource",
    "SecretSyntaxError",
    "SecretsFileError",
    "install_log_redaction",
    "redact",
    "redact_tree",
    "remember",
    "secret_forms",
]

REDACTED = "***"
MIN_REDACT_LENGTH = 4

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_WHOLE_RE = re.compile(rf"^\$({_NAME})$")
# "$$", "${NAME}", or a "${" that does not close properly (reported as a mistake)
_TOKEN_RE = re.compile(rf"\$\$|\$\{{({_NAME})\}}|\$\{{[^}}]*\}}?")
_NAME_RE = re.compile(rf"^{_NAME}$")


class MissingSecret(KeyError):
    """No source provides the secret ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (f"secret {self.name!r} is not set: put it in the secrets file or the "
                f"environment")


class SecretSyntaxError(ValueError):
    """A ``${...}`` reference that is not ``${NAME}``."""


class SecretsFileError(ValueError):
    """The secrets file cannot be read; ``line``/``col`` are 1-based."""

    def __init__(self, file: str, line: int, col: int, message: str) -> None:
        super().__init__(f"{file}:{line}:{col}: {message}")
        self.file = file
        self.line = line
        self.col = col
        self.message = message


# ---------------------------------------------------------------------------------------
# Process-wide redaction


MIN_BASE64_CORE = 8  # shorter stretches of base64 would match ordinary text by chance
_BASIC_RE = re.compile(r"(?i)\b(basic)(\s+)([A-Za-z0-9+/_-]{4,}={0,2})")


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 text that ``raw`` alone determines wherever it sits in a longer byte string:
    one stretch per alignment (offset mod 3), standard and URL-safe alphabets."""
    cores: set[str] = set()
    n = len(raw)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + raw).decode()
        first = -(-8 * k // 6)          # the first character made of the secret's bits only
        last = 8 * (k + n) // 6         # characters before this one are complete
        core = enc[first:last]
        if len(core) >= MIN_BASE64_CORE:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def secret_forms(value: str) -> set[str]:
    """The texts ``value`` may appear as: as given, percent-encoded, JSON-escaped, base64."""
    forms = {value}
    for q in (quote(value, safe=""), quote(value, safe="/:@"), quote_plus(value)):
        forms.add(q)
        forms.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), q))
    import json as _json
    forms.add(_json.dumps(value)[1:-1])
    raw = value.encode()
    std = base64.b64encode(raw).decode()
    for enc in (std, std.replace("+", "-").replace("/", "_")):
        forms.add(enc)
        forms.add(enc.rstrip("="))
    if len(value) >= MIN_BASE64_CORE - 2:
        forms |= _base64_cores(raw)
    return {f for f in forms if len(f) >= MIN_REDACT_LENGTH}


class _Redactor:
    """Every secret value resolved so far; thread-safe, one compiled regex, rebuilt on change."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) < MIN_REDACT_LENGTH or value in self._values:
            return
        with self._lock:
            self._values.add(value)
            forms = set().union(*(secret_forms(v) for v in self._values))
            # longest first so a secret that contains another is blanked whole
            alternatives = sorted(forms, key=len, reverse=True)
            self._regex = re.compile("|".join(re.escape(v) for v in alternatives))

    def _basic(self, match: re.Match[str]) -> str:
        """``Basic <base64(user:pass)>``: blanked when the decoded credentials hold a secret."""
        token = match.group(3)
        try:
            decoded = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_" if
                                       ("-" in token or "_" in token) else None).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return match.group(0)
        regex = self._regex
        if regex is not None and regex.search(decoded):
            return f"{match.group(1)}{match.group(2)}{REDACTED}"
        return match.group(0)

    def redact(self, text: str) -> str:
        regex = self._regex
        if regex is None or not text:
            return text
        if "asic" in text:  # cheap test before the Basic-credentials regex
            text = _BASIC_RE.sub(self._basic, text)
        return regex.sub(REDACTED, text)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._regex = None


_process_redactor = _Redactor()


def redact(text: str) -> str:
    """``text`` with every secret value resolved so far in this process replaced by ``***``."""
    return _process_redactor.redact(text)


def redact_tree(value: Any) -> Any:
    """:func:`redact` applied to every string (keys too) in nested dicts and lists."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return value


def remember(value: str) -> None:
    """Have :func:`redact` hide ``value`` too (for secrets that arrive by other routes)."""
    _process_redactor.add(value)


class RedactingFilter(logging.Filter):
    """A handler filter that passes every record's text, exception traceback and stack
    through :func:`redact` before any formatter sees it. The message is formatted here
    (``record.args`` cleared) and the traceback rendered into ``record.exc_text`` (with
    ``exc_info`` cleared) so no handler can re-render the unredacted originals."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: keep the template only, never the raw args
            message = f"{record.msg} (log arguments could not be formatted)"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Attach a :class:`RedactingFilter` to every handler of the root logger (once each).
    Filters on handlers, not loggers, see records from child loggers too. Call it after
    ``logging.basicConfig`` (or after adding handlers); calling it again is harmless."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def secret_argument(given: str | None, file: str | None, env: str, flag: str) -> str | None:
    """A secret for a command-line option: from ``file`` (first line, stripped), else the
    environment variable ``env``, else ``given`` on the command line, which every user of
    the machine can read in ``ps``: that case logs a warning naming the safer routes."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {flag}-file {file}: {getattr(exc, 'strerror', None) or exc}") from None
        from pipelines.file_perms import warn_if_shared
        warn_if_shared(Path(file), f"{flag}-file")
        lines = text.strip().splitlines()
        value = lines[0].strip() if lines else ""
        if not value:
            raise ValueError(f"{flag}-file {file} is empty")
        return value
    if given:
        logging.getLogger("pipelines.secrets").warning(
            "%s on the command line is visible to every user of this machine (ps): use "
            "%s-file FILE or the environment variable %s instead", flag, flag, env)
        return given
    return os.environ.get(env) or None


# ---------------------------------------------------------------------------------------
# Reading the secrets file


def _load_yaml_secrets(path: Path, text: str) -> dict[str, str] | None:
    """The file as ``NAME: value`` YAML, or None if it is not a YAML mapping."""
    from pipelines.yaml_limits import YamlLimitError, check_expansion
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    except RecursionError:
        raise SecretsFileError(str(path), 1, 1, "the document nests too deep") from None
    if not isinstance(node, yaml.MappingNode):
        return None
    try:
        check_expansion(node, str(path))
    except YamlLimitError:
        mark = node.start_mark
        raise SecretsFileError(str(path), mark.line + 1, mark.column + 1, "YAML aliases expand to too "
                               "many nodes (a secrets file is NAME: value lines)") from None
    out: dict[str, str] = {}
    for key_node, value_node in node.value:
        mark = key_node.start_mark
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SecretsFileError(str(path), mark.line + 1, mark.column + 1,
                                   f"secret name {name!r} is not of the form [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value_node, yaml.ScalarNode):
            vm = value_node.start_mark
            raise SecretsFileError(str(path), vm.line + 1, vm.column + 1,
                                   f"secret {name!r} must be a single value, not a list or mapping")
        # the scalar as written (so `true` stays "true" and `007` stays "007"); null -> ""
        value = "" if value_node.tag == "tag:yaml.org,2002:null" else value_node.value
        out[name.upper()] = value
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        if value[0] == '"':
            inner = (inner.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\"))
        return inner
    # an unquoted value may carry a trailing " # comment"
    return re.split(r"\s+#", value, maxsplit=1)[0].strip()


def _load_dotenv_secrets(path: Path, text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        col = raw.find(name) + 1 if name else 1
        if not sep:
            raise SecretsFileError(str(path), lineno, col, "expected NAME=value")
        if not _NAME_RE.match(name):
            raise SecretsFileError(str(path), lineno, col,
                                   f"secret name {name!r} is not of the form [A-Za-z_][A-Za-z0-9_]*")
        out[name.upper()] = _unquote(value.strip())
    return out


def load_secrets_file(path: Path) -> dict[str, str]:
    """Names (upper-cased) to values. ``*.yml``/``*.yaml`` is YAML, ``*.env``/``.env`` is
    dotenv; anything else is YAML if it reads as a mapping, else dotenv."""
    path = Path(path)
    from pipelines.file_perms import warn_if_shared
    warn_if_shared(path, "secrets file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsFileError(str(path), 1, 1, f"cannot read secrets file: {exc.__class__.__name__}: "
                                                f"{getattr(exc, 'strerror', None) or exc}") from None
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        loaded = _load_yaml_secrets(path, text)
        if loaded is None:
            if not text.strip():
                return {}
            try:
                yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
                raise SecretsFileError(str(path), line, col, f"YAML syntax error: {exc.problem}") from None
            raise SecretsFileError(str(path), 1, 1, "expected a mapping of NAME: value")
        return loaded
    if suffix == ".env" or path.name == ".env":
        return _load_dotenv_secrets(path, text)
    loaded = _load_yaml_secrets(path, text)
    return loaded if loaded is not None else _load_dotenv_secrets(path, text)


# ---------------------------------------------------------------------------------------


class SecretSource:
    """Secret values by case-insensitive name, and substitution of references to them."""

    def __init__(self, *layers: Mapping[str, str]) -> None:
        # earlier layers win; each is indexed by upper-cased name
        self._layers: list[dict[str, str]] = []
        for layer in layers:
            index: dict[str, str] = {}
            for name, value in layer.items():
                key = name.upper()
                # two env names differing only in case: the all-upper one wins
                if key in index and name != key:
                    continue
                index[key] = value
            self._layers.append(index)
        self._used: set[str] = set()
        self._used_regex: re.Pattern[str] | None = None
        # validation without the secrets at hand (CI): the loader then skips what a missing
        # secret would have decided instead of reporting it; never set this for a router
        self.allow_missing = False

    @classmethod
    def from_sources(cls, secrets_file: Path | str | None = None,
                     environ: Mapping[str, str] | None = None) -> SecretSource:
        """The secrets file (if given) first, then ``environ`` (default ``os.environ``).
        Raises ``SecretsFileError`` (with a position) when the file is unusable."""
        layers: list[Mapping[str, str]] = []
        if secrets_file is not None:
            layers.append(load_secrets_file(Path(secrets_file)))
        layers.append(dict(os.environ if environ is None else environ))
        return cls(*layers)

    @classmethod
    def empty(cls) -> SecretSource:
        return cls()

    def get(self, name: str) -> str:
        key = name.upper()
        for layer in self._layers:
            if key in layer:
                return layer[key]
        raise MissingSecret(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name.upper() in layer for layer in self._layers)

    def _use(self, value: str) -> None:
        if len(value) >= MIN_REDACT_LENGTH and value not in self._used:
            self._used.add(value)
            alternatives = sorted(self._used, key=len, reverse=True)
            self._used_regex = re.compile("|".join(re.escape(v) for v in alternatives))
        _process_redactor.add(value)

    def references(self, value: str) -> list[str]:
        """Secret names ``value`` refers to, without resolving them."""
        if "$" not in value:
            return []
        m = _WHOLE_RE.match(value)
        if m:
            return [m.group(1)]
        return [t.group(1) for t in _TOKEN_RE.finditer(value) if t.group(1)]

    def resolve(self, value: str) -> str:
        """``value`` with its secret references substituted. Raises ``MissingSecret`` for a
        name no source has, ``SecretSyntaxError`` for a malformed ``${...}``."""
        if "$" not in value:
            return value
        m = _WHOLE_RE.match(value)
        if m:
            secret = self.get(m.group(1))
            self._use(secret)
            return secret

        def substitute(token: re.Match[str]) -> str:
            text = token.group(0)
            if text == "$$":
                return "$"
            name = token.group(1)
            if name is None:
                raise SecretSyntaxError(
                    f"{text!r} is not a secret reference: write ${{NAME}} with NAME of the form "
                    f"[A-Za-z_][A-Za-z0-9_]*, or $$ for a literal $")
            secret = self.get(name)
            self._use(secret)
            return secret

        return _TOKEN_RE.sub(substitute, value)

    def resolve_tree(self, value: Any) -> Any:
        """``resolve`` applied to every string in nested dicts and lists (keys untouched)."""
        if isinstance(value, str):
            return self.resolve(value)
        if isinstance(value, dict):
            return {k: self.resolve_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve_tree(v) for v in value]
        return value

    @property
    def used_values(self) -> frozenset[str]:
        return frozenset(self._used)

    def redact(self, text: str) -> str:
        """``text`` with every value this source has resolved (4+ characters) as ``***``."""
        if self._used_regex is None or not text:
            return text
        return self._used_regex.sub(REDACTED, text)

    def names(self) -> Iterable[str]:
        seen: set[str] = set()
        for layer in self._layers:
            seen.update(layer)
        return sorted(seen)
