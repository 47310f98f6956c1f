"""Unit tests for pipelines, kept next to them and run by ``pipeline test``.

A test file (``*.tests.yaml``) names the pipelines it tests and lists cases::

    pipelines: [pipeline.yaml]            # relative to this file
    tests:
      - name: a frame becomes a prediction request
        input:
          device: cam-1                   # default: test-device
          project: demo                   # default: default
          path: /images
          content_type: application/octet-stream
          file: frames/coffee.jpg         # or text: "...", json: {...}, base64: "..."
        expect:
          - pipeline: camera-caption
            step: predict
            content_type: application/json
            json_subset: {version: 2e1dddc8...}   # or json (exact), text (exact), contains, size
      - name: other paths are unmatched
        input: {path: /elsewhere, json: {a: 1}}
        unmatched: true
      - name: bad CBOR is a failure of the decode step
        input: {path: /cbor, content_type: application/cbor, text: "not cbor"}
        failures: [{pipeline: sensors, step: decode, error_contains: CBOR}]

The cases run the real engine on the real pipeline files: every transformer runs (a
``webhook`` transformer really calls its URL); destinations are not called, the test
checks what each one would have been given. Secrets a test does not provide resolve to
placeholders, so tests run in CI without the real ones.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from pipelines.components import ComponentContext
from pipelines.config import load_pipelines
from pipelines.engine import Engine, build_pipelines
from pipelines.message import Message
from pipelines.secrets import MissingSecret, SecretSource
from pipelines.yaml_limits import YamlLimitError, safe_load_bounded


class TestFileError(Exception):
    """The test file itself is wrong (not the pipelines under test)."""


class PlaceholderSecrets(SecretSource):
    """Real secrets where given; ``test-secret-<name>`` for the rest."""

    def get(self, name: str) -> str:
        try:
            return super().get(name)
        except MissingSecret:
            return f"test-secret-{name.lower()}"


@dataclass
class CaseResult:
    name: str
    passed: bool
    problems: list[str] = field(default_factory=list)


def _payload(spec: dict[str, Any], base: Path) -> bytes:
    given = [k for k in ("file", "text", "json", "base64") if k in spec]
    if len(given) != 1:
        raise TestFileError("input needs exactly one of file, text, json, base64")
    kind = given[0]
    if kind == "file":
        path = (base / spec["file"]).resolve()
        if not path.is_file():
            raise TestFileError(f"input file {spec['file']} not found (relative to {base})")
        return path.read_bytes()
    if kind == "text":
        return str(spec["text"]).encode()
    if kind == "json":
        return json.dumps(spec["json"]).encode()
    try:
        return base64.b64decode(spec["base64"], validate=True)
    except ValueError as exc:
        raise TestFileError(f"input base64 is not valid: {exc}") from None


def _subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _subset(e, a) for e, a in zip(expected, actual, strict=True))
    return bool(expected == actual)


def _check_delivery(exp: dict[str, Any], msg: Message) -> list[str]:
    out = []
    if "content_type" in exp and msg.content_type != exp["content_type"]:
        out.append(f"content type {msg.content_type!r}, expected {exp['content_type']!r}")
    text = msg.payload.decode("utf-8", "replace")
    if "text" in exp and text != exp["text"]:
        out.append(f"payload {text[:200]!r} is not the expected text")
    if "contains" in exp and str(exp["contains"]) not in text:
        out.append(f"payload does not contain {exp['contains']!r}")
    if "size" in exp and len(msg.payload) != int(exp["size"]):
        out.append(f"payload is {len(msg.payload)} bytes, expected {exp['size']}")
    for key in ("json", "json_subset"):
        if key in exp:
            try:
                actual = json.loads(msg.payload)
            except ValueError:
                out.append("payload is not JSON")
                continue
            ok = actual == exp[key] if key == "json" else _subset(exp[key], actual)
            if not ok:
                out.append(f"JSON {json.dumps(actual)[:300]} does not match {key} {json.dumps(exp[key])[:300]}")
    return out


async def run_test_file(path: Path, *, secrets_file: Path | None = None,
                        url_overrides: dict[str, str] | None = None) -> list[CaseResult]:
    try:
        doc = safe_load_bounded(path.read_text(), str(path))
    except YamlLimitError as exc:
        raise TestFileError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise TestFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tests"), list):
        raise TestFileError(f"{path}: expected a mapping with a `tests:` list")
    base = path.parent
    pipeline_paths = [base / p for p in (doc.get("pipelines") or [])]
    if not pipeline_paths:
        raise TestFileError(f"{path}: name the pipeline files under test in `pipelines:`")
    layers = []
    if secrets_file:
        from pipelines.secrets import load_secrets_file
        layers.append(load_secrets_file(secrets_file))
    loaded = load_pipelines(pipeline_paths, PlaceholderSecrets(*layers))
    if loaded.problems:
        raise TestFileError("the pipelines under test did not load:\n" + "\n".join(map(str, loaded.problems)))
    async with httpx.AsyncClient(timeout=30) as http:
        def context(pc: Any, sc: Any) -> ComponentContext:
            return ComponentContext(http=http, pipeline=pc.name, step=sc.name,
                                    extra={"url_overrides": url_overrides or {}, "timeout": sc.timeout or 30})
        engine = Engine(build_pipelines(loaded.pipelines, context))
        results = []
        for i, case in enumerate(doc["tests"]):
            results.append(await _run_case(engine, case, i, base))
        await engine.close()
    return results


async def _run_case(engine: Engine, case: Any, index: int, base: Path) -> CaseResult:
    if not isinstance(case, dict):
        raise TestFileError(f"test #{index + 1} is not a mapping")
    name = str(case.get("name") or f"test #{index + 1}")
    spec = case.get("input")
    if not isinstance(spec, dict) or "path" not in spec:
        raise TestFileError(f"{name}: `input` needs at least `path` and a payload")
    msg = Message.new(device_id=str(spec.get("device", "test-device")),
                      project_id=str(spec.get("project", "default")), path=str(spec["path"]),
                      content_type=str(spec.get("content_type", "application/octet-stream")),
                      payload=_payload(spec, base), metadata=dict(spec.get("metadata") or {}))
    outcome, _ = await engine.route(msg)
    problems: list[str] = []
    if case.get("unmatched"):
        if outcome.matched:
            problems.append("expected no pipeline to match, but some did")
        return CaseResult(name, not problems, problems)
    if not outcome.matched:
        problems.append("no pipeline matched this input")
    remaining = list(outcome.deliveries)
    for exp in case.get("expect") or []:
        candidates = [d for d in remaining if d.pipeline == exp.get("pipeline", d.pipeline)
                      and d.step == exp.get("step", d.step)]
        if not candidates:
            problems.append(f"no delivery at {exp.get('pipeline', '*')}/{exp.get('step', '*')}")
            continue
        best = None
        for d in candidates:
            issues = _check_delivery(exp, d.message)
            if not issues:
                best = d
                break
            best_issues = issues
        if best is None:
            problems.extend(f"{exp.get('pipeline', '*')}/{exp.get('step', '*')}: {p}" for p in best_issues)
        else:
            remaining.remove(best)
    if "deliveries" in case and len(outcome.deliveries) != int(case["deliveries"]):
        problems.append(f"{len(outcome.deliveries)} deliveries, expected {case['deliveries']}")
    expected_failures = case.get("failures") or []
    for f in expected_failures:
        hit = [d for d in outcome.dead if d.pipeline == f.get("pipeline", d.pipeline)
               and d.step == f.get("step", d.step) and str(f.get("error_contains", "")) in d.error]
        if not hit:
            got = "; ".join(f"{d.pipeline}/{d.step}: {d.error}" for d in outcome.dead) or "none"
            problems.append(f"expected a failure at {f.get('pipeline', '*')}/{f.get('step', '*')}"
                            f" containing {f.get('error_contains', '')!r}; failures: {got}")
    if not expected_failures:
        problems.extend(f"unexpected failure at {d.pipeline}/{d.step}: {d.error}" for d in outcome.dead)
    return CaseResult(name, not problems, problems)
