"""``pipeline test``: run the unit tests that live next to the pipelines.

    pipeline test                      # every *.tests.yaml in this folder
    pipeline test pipeline.tests.yaml examples/
    pipeline test --override https://api.replicate.com=http://127.0.0.1:5010

The format is in ``pipelines.pipeline_tests``. Exit 0 when every case passes, 1 when one
fails, 2 when a test file or the pipelines under test cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pipelines.commands.send import parse_overrides
from pipelines.pipeline_tests import TestFileError, run_test_file
from pipelines.secrets import redact


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("test", help="run the pipelines' own unit tests (*.tests.yaml)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="test files or folders (default: *.tests.yaml here)")
    p.add_argument("--secrets", help="secrets file; secrets not given become placeholders")
    p.add_argument("--override", action="append", default=[], metavar="FROM=TO",
                   help="send a webhook transformer's calls for base URL FROM to TO")
    p.set_defaults(func=run)


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths or ["."]:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted([*path.glob("*.tests.yaml"), *path.glob("*.tests.yml")]))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"no test file or folder {p}")
    return out


def run(args: argparse.Namespace) -> int:
    files = _files(args.paths)
    if not files:
        print("no *.tests.yaml files found", file=sys.stderr)
        return 2
    failed = passed = 0
    for f in files:
        try:
            results = asyncio.run(run_test_file(f, secrets_file=Path(args.secrets) if args.secrets else None,
                                                url_overrides=parse_overrides(args.override)))
        except TestFileError as exc:
            print(f"{f}: {redact(str(exc))}", file=sys.stderr)
            return 2
        for r in results:
            if r.passed:
                passed += 1
                print(f"PASS {f}: {r.name}")
            else:
                failed += 1
                print(f"FAIL {f}: {r.name}")
                for problem in r.problems:
                    print(f"     {redact(problem)}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
