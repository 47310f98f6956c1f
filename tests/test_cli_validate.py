"""``pipeline validate`` (run as a real subprocess), the CLI framework, and
``pipeline components``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.secrets import SecretSource

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
filter:
  path: "/images"
steps:
  - name: png
    transformer: {type: change-content-type, version: v1, parameters: {content_type: image/png}}
  - name: url
    transformer: {type: data-url, version: v1}
  - name: embed
    transformer: {type: embed-in-json, version: v1, parameters: {key: image}}
  - name: create-payload
    transformer:
      type: json-patch
      version: v1
      parameters:
        patch: |
          [
            {"op": "add", "path": "/input", "value": {"image": ""}},
            {"op": "move", "from": "/image", "path": "/input/image"}
          ]
  - name: predict
    destination:
      type: webhook
      version: v1
      parameters:
        url: https://api.replicate.com/v1/predictions
        headers:
          Authorization: $REPLICATE_TOKEN
"""

BAD = """\
steps:
  - name: png
    transformer: {type: change-content-typ, parameters: {content_type: image/png}}
  - name: patch
    transformer:
      type: json-patch
      parameters:
        patch: '[{"op": "${PATCH_OP}", "path": "/a"}]'
"""


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k.upper() not in ("REPLICATE_TOKEN", "PATCH_OP")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_clean_file_with_secrets_file(tmp_path: Path) -> None:
    (tmp_path / "caption.yaml").write_text(GOOD)
    (tmp_path / "secrets.env").write_text('# tokens\nreplicate_token="Bearer r8_cli_secret_value"\n')
    (tmp_path / "secrets.env").chmod(0o600)  # a shared secrets file would be warned about
    proc = run_cli("validate", "caption.yaml", "--secrets", "secrets.env", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "1 pipeline OK\n"
    assert proc.stderr == ""

    proc = run_cli("validate", "-v", str(tmp_path), "--secrets", "secrets.env", cwd=tmp_path)
    assert proc.returncode == 0
    assert "caption: 5 steps, filter path=/images" in proc.stdout
    assert "r8_cli_secret_value" not in proc.stdout


def test_secret_from_environment_and_missing_secret(tmp_path: Path) -> None:
    (tmp_path / "caption.yaml").write_text(GOOD)
    proc = run_cli("validate", "caption.yaml", cwd=tmp_path, env={"Replicate_Token": "Bearer from-env"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a fresh clone: the secret is not set yet; a warning that says where it goes, exit 0
    proc = run_cli("validate", "caption.yaml", cwd=tmp_path)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(
        "caption.yaml:27:26: warning: pipeline 'caption' step 'predict' parameter 'headers.Authorization': "
        "secret 'REPLICATE_TOKEN' is not set (put it in the secrets file or the environment); ")
    assert "`pipeline run` makes $REPLICATE_TOKEN" in lines[0] and "--strict" in lines[0]
    assert lines[1:] == ["1 pipeline OK (1 secret not set: see the warning above)"]
    # --strict (the machine that will run the router): a problem, exit 1
    proc = run_cli("validate", "--strict", "caption.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "caption.yaml:27:26: pipeline 'caption' step 'predict' parameter 'headers.Authorization': secret "
        "'REPLICATE_TOKEN' is not set (put it in the secrets file or the environment)",
        "1 problem in 1 file",
    ]
    proc = run_cli("validate", "caption.yaml", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0
    assert [p["severity"] for p in json.loads(proc.stdout)] == ["warning"]
    # CI without the secrets: everything else is still checked
    proc = run_cli("validate", "--allow-missing-secrets", "caption.yaml", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "1 pipeline OK\n")


def test_problems_as_text_and_json_with_secrets_redacted(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "secrets.yaml").write_text("PATCH_OP: sneaky-secret-op-42\n")
    proc = run_cli("validate", "bad.yaml", "--secrets", "secrets.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == ("bad.yaml:3:25: step 'png': unknown transformer type 'change-content-typ'; "
                        "did you mean 'change-content-type'?")
    assert lines[1].startswith("bad.yaml:8:16: step 'patch': transformer 'json-patch' parameter 'patch': ")
    assert lines[2] == "2 problems in 1 file"
    assert "sneaky-secret-op-42" not in proc.stdout + proc.stderr

    proc = run_cli("validate", "bad.yaml", "--secrets", "secrets.yaml", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 1
    problems = json.loads(proc.stdout)
    assert [(p["file"], p["line"], p["col"], p["pipeline"], p["step"]) for p in problems] == [
        ("bad.yaml", 3, 25, "bad", "png"), ("bad.yaml", 8, 16, "bad", "patch")]
    assert "did you mean 'change-content-type'?" in problems[0]["message"]
    assert "sneaky-secret-op-42" not in proc.stdout


def test_json_output_when_clean_and_bad_secrets_file(tmp_path: Path) -> None:
    (tmp_path / "ok.yml").write_text("steps:\n  - {name: s, destination: {type: lightdb-stream}}\n")
    proc = run_cli("validate", "ok.yml", "--format", "json", cwd=tmp_path)
    assert (proc.returncode, json.loads(proc.stdout)) == (0, [])

    (tmp_path / "bad.env").write_text("GOOD=1\nthis line has no equals\n")
    proc = run_cli("validate", "ok.yml", "--secrets", "bad.env", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == "bad.env:2:1: expected NAME=value"


def test_framework_version_help_and_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "pipeline 0.1.0")

    proc = run_cli("frobnicate", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown command 'frobnicate'" in proc.stderr
    assert "validate" in proc.stderr and "usage: pipeline" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli("validate", "x.yaml", "--format", "xml", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli("validate", "nothing-here.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == "nothing-here.yaml:1:1: no such file or directory"


def test_a_failing_command_is_one_redacted_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # validate itself never raises, so the failure is injected where the command calls the loader
    SecretSource({"T": "cli-error-secret-77"}).resolve("$T")
    from pipelines.commands import validate

    def explode(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("store at /var/x refused\ncli-error-secret-77")

    monkeypatch.setattr(validate, "load_pipelines", explode)
    (tmp_path / "ok.yml").write_text("steps: []\n")
    assert cli.main(["validate", str(tmp_path / "ok.yml")]) == 2
    err = capsys.readouterr().err
    assert err == "pipeline validate: error: store at /var/x refused ***\n"


def test_components_command_documents_every_registered_component(capsys: pytest.CaptureFixture[str]) -> None:
    from destinations.registry import registry as destinations
    from transformers.registry import registry as transformers

    assert cli.main(["components", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    listed = {(c["kind"], c["type"]) for c in doc["components"]}
    expected = {("transformer", t) for t in transformers.names()} | {
        ("destination", d) for d in destinations.names()}
    assert listed == expected
    unsupported = {(u["kind"], u["type"]) for u in doc["unsupported"]}
    assert {("transformer", "location"), ("destination", "aws-s3")} <= unsupported

    patch = next(c for c in doc["components"] if c["type"] == "json-patch")
    assert patch["version"] == "1.0.0" and patch["summary"]
    [field] = patch["parameters"]
    assert field["name"] == "patch" and field["required"] is True and field["description"]

    assert cli.main(["components", "change-content-type"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("change-content-type  (transformer, v1.0.0)")
    assert "content_type (str, required)" in text

    assert cli.main(["components", "--format", "markdown", "--kind", "destination"]) == 0
    md = capsys.readouterr().out
    assert "### `webhook` (destination, v1.0.0)" in md and "| `url` | `str` | required |" in md

    assert cli.main(["components", "no-such-thing"]) == 1
    assert "unknown component type 'no-such-thing'" in capsys.readouterr().err


def test_console_script_entry_point_is_main() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'pipeline = "pipelines.cli:main"' in text
    assert textwrap.dedent(cli.__doc__ or "").strip()
