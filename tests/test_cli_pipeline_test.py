"""``pipeline test``: the pipelines' own unit tests, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SENSORS = """
pipelines:
  sensors:
    filter: {path: /env, content_type: application/cbor}
    steps:
      - name: decode
        transformer: {type: cbor-to-json, version: v1}
      - name: stamp
        transformer: {type: extract-timestamp, version: v1}
      - name: store
        destination: {type: lightdb-stream, version: v1}
"""


def pipeline_test(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "test", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_shipped_default_pipeline_tests_pass():
    out = pipeline_test(cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed, 0 failed" in out.stdout


def test_passing_and_failing_cases_are_reported_with_reasons(tmp_path):
    (tmp_path / "sensors.yaml").write_text(SENSORS)
    # a6 61 74 ... : {"t": 1700000000, "c": 21.5} in CBOR, written as base64
    import base64

    import cbor2
    good = base64.b64encode(cbor2.dumps({"t": 1700000000, "c": 21.5})).decode()
    (tmp_path / "sensors.tests.yaml").write_text(f"""
pipelines: [sensors.yaml]
tests:
  - name: decodes and takes the timestamp out
    input: {{path: /env, content_type: application/cbor, base64: "{good}"}}
    expect:
      - {{pipeline: sensors, step: store, json: {{c: 21.5}}}}
  - name: garbage is a failure of the decode step
    input: {{path: /env, content_type: application/cbor, text: "\\xff\\xff not cbor"}}
    failures: [{{pipeline: sensors, step: decode}}]
  - name: a wrong expectation fails, saying why
    input: {{path: /env, content_type: application/cbor, base64: "{good}"}}
    expect:
      - {{pipeline: sensors, step: store, json: {{c: 99}}}}
""")
    out = pipeline_test(cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "PASS sensors.tests.yaml: decodes and takes the timestamp out" in out.stdout
    assert "PASS sensors.tests.yaml: garbage is a failure of the decode step" in out.stdout
    assert "FAIL sensors.tests.yaml: a wrong expectation fails, saying why" in out.stdout
    assert "does not match json" in out.stdout
    assert "2 passed, 1 failed" in out.stdout


def test_a_broken_test_file_or_pipeline_is_a_clear_error(tmp_path):
    (tmp_path / "a.tests.yaml").write_text("tests: [oops")
    out = pipeline_test("a.tests.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
    (tmp_path / "bad.yaml").write_text("steps:\n  - name: x\n    transformer: {type: nope}\n")
    (tmp_path / "b.tests.yaml").write_text("pipelines: [bad.yaml]\ntests:\n  - input: {path: /x, text: hi}\n")
    out = pipeline_test("b.tests.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "bad.yaml:3:" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "c.tests.yaml").write_text("pipelines: [bad.yaml]\ntests:\n  - input: {text: hi}\n")
    out = pipeline_test("missing.tests.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "no test file" in out.stderr
