"""``pipeline validate PATH... [--secrets FILE] [--strict] [--allow-missing-secrets] [--format text|json] [-v]``

Loads the pipeline files exactly as the router does and prints every problem as
``FILE:LINE:COL: message`` (or, with ``--format json``, a JSON list of
``{file, line, col, message, pipeline, step, severity}``). When all is well it prints
``N pipelines OK`` (``-v`` lists them). Exit 0 when clean, 1 when there are problems.
A router configuration file (``router.yaml``: store, listeners, pipelines, ...) is recognised
by its content and checked too, with the pipeline files it names.

Secrets come from ``--secrets`` (YAML or ``.env``) and then the environment, as for the
router. A reference no source provides is a warning (``FILE:LINE:COL: warning: ...``) that
says where to put it, and the exit code stays 0: on a fresh clone ``$REPLICATE_TOKEN`` is not
set yet, and ``pipeline run`` makes one for the local predictions service. ``--strict`` makes
missing secrets problems (exit 1) for the machine that will run the router;
``--allow-missing-secrets`` leaves them out altogether (CI). Secret values are never printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.config import LoadResult, Position, Problem, load_pipelines
from pipelines.secrets import SecretsFileError, SecretSource, redact


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check pipeline files and report every problem as FILE:LINE:COL",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="pipeline file or directory of *.yml/*.yaml")
    p.add_argument("--secrets", metavar="FILE", type=Path,
                   help="secrets file (NAME: value YAML or NAME=value .env), read before the environment")
    p.add_argument("--allow-missing-secrets", action="store_true",
                   help="check everything except whether the secrets are set (CI without secrets)")
    p.add_argument("--strict", action="store_true",
                   help="a secret that is not set is a problem (exit 1), not a warning")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("-v", "--verbose", action="store_true", help="list the pipelines that loaded")
    p.set_defaults(func=run)


def validate(paths: list[str], secrets_file: Path | None, allow_missing_secrets: bool = False,
             ) -> tuple[LoadResult | None, list[Problem]]:
    """Load ``paths``; the problems include an unusable secrets file."""
    try:
        secrets = SecretSource.from_sources(secrets_file)
    except SecretsFileError as exc:
        return None, [Problem(Position(exc.file, exc.line, exc.col), exc.message)]
    secrets.allow_missing = allow_missing_secrets
    result = load_pipelines(paths, secrets)
    return result, list(result.problems)


def missing_secrets(paths: list[str], secrets_file: Path | None) -> tuple[LoadResult | None, list[Problem],
                                                                          list[Problem]]:
    """``(result, problems, warnings)``: the warnings are the secrets no source provides
    (what a load without ``allow_missing`` adds to one with it)."""
    result, problems = validate(paths, secrets_file, allow_missing_secrets=True)
    if result is None or problems:
        return result, problems, []
    _, strict = validate(paths, secrets_file, allow_missing_secrets=False)
    known = {(p.position, p.message) for p in problems}
    return result, problems, [p for p in strict if (p.position, p.message) not in known]


MISSING_HINT = ("a secrets file (--secrets FILE, lines NAME=value) or the environment provides it; "
                "`pipeline run` makes $REPLICATE_TOKEN for its local predictions service by itself")


def run(args: argparse.Namespace) -> int:
    from pipelines.router_config import is_router_config, load_router_config

    paths, secrets_file, config_problems = list(args.paths), args.secrets, []
    for path in args.paths:  # a router.yaml: check it, then the pipelines it names
        if is_router_config(Path(path)):
            config = load_router_config(Path(path))
            config_problems += config.problems
            paths.remove(path)
            paths += [str(p) for p in config.pipelines]
            secrets_file = secrets_file or config.secrets
    if not paths and not config_problems:
        print("0 pipelines OK")
        return 0
    warnings: list[Problem] = []
    if args.strict or args.allow_missing_secrets:
        result, problems = validate(paths, secrets_file, args.allow_missing_secrets) if paths else (None, [])
    else:
        result, problems, warnings = missing_secrets(paths, secrets_file) if paths else (None, [], [])
    problems = config_problems + problems
    if args.format == "json":
        print(json.dumps([{**p.as_dict(), "message": redact(p.message), "severity": "error"} for p in problems]
                         + [{**p.as_dict(), "message": redact(p.message), "severity": "warning"}
                            for p in warnings], indent=2))
        return 1 if problems else 0

    for problem in problems:
        print(redact(str(problem)))
    for warning in warnings:
        print(redact(f"{warning.position}: warning: {warning.message}; {MISSING_HINT} "
                     "(--strict: fail instead)"))
    if problems:
        files = len({p.position.file for p in problems})
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} "
              f"in {files} file{'s' if files != 1 else ''}")
        return 1
    if result is None:
        print("router configuration OK")
        return 0
    if args.verbose:
        for pc in result.pipelines:
            state = "" if pc.enabled else "  (disabled)"
            print(f"{pc.position}: {pc.name}: {len(pc.steps)} step{'s' if len(pc.steps) != 1 else ''}, "
                  f"filter {pc.filter.describe()}{state}")
    count = len(result.pipelines)
    print(f"{count} pipeline{'s' if count != 1 else ''} OK"
          + (f" ({len(warnings)} secret{'s' if len(warnings) != 1 else ''} not set: see the warning"
             f"{'s' if len(warnings) != 1 else ''} above)" if warnings else ""))
    return 0
