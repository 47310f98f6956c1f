"""``pipeline validate PATH... [--secrets FILE] [--allow-missing-secrets] [--format text|json] [-v]``

Loads the pipeline files exactly as the router does and prints every problem as
``FILE:LINE:COL: message`` (or, with ``--format json``, a JSON list of
``{file, line, col, message, pipeline, step}``). When all is well it prints
``N pipelines OK`` (``-v`` lists them). Exit 0 when clean, 1 when there are problems.

Secrets come from ``--secrets`` (YAML or ``.env``) and then the environment, as for the
router; a reference no source provides is a problem, unless ``--allow-missing-secrets``
(for CI, where the secrets are not at hand). Secret values are never printed.
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


def run(args: argparse.Namespace) -> int:
    result, problems = validate(args.paths, args.secrets, args.allow_missing_secrets)
    if args.format == "json":
        print(json.dumps([{**p.as_dict(), "message": redact(p.message)} for p in problems], indent=2))
        return 1 if problems else 0

    for problem in problems:
        print(redact(str(problem)))
    if problems:
        files = len({p.position.file for p in problems})
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} "
              f"in {files} file{'s' if files != 1 else ''}")
        return 1
    assert result is not None
    if args.verbose:
        for pc in result.pipelines:
            state = "" if pc.enabled else "  (disabled)"
            print(f"{pc.position}: {pc.name}: {len(pc.steps)} step{'s' if len(pc.steps) != 1 else ''}, "
                  f"filter {pc.filter.describe()}{state}")
    count = len(result.pipelines)
    print(f"{count} pipeline{'s' if count != 1 else ''} OK")
    return 0
