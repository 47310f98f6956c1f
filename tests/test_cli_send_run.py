"""``pipeline send`` and ``pipeline run`` as a user runs them: real subprocesses, real servers."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from http_recorder import HTTPRecorder, Reply
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SECRET_TOKEN = "r8_thisIsAVerySecretTokenValue123"


def pipeline(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 120,
             stdin: bytes | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, timeout=timeout, input=stdin)


def make_png(path: Path) -> bytes:
    Image.new("RGB", (64, 48), (200, 120, 40)).save(path, format="PNG")
    return path.read_bytes()


def test_send_runs_the_default_pipeline_and_shows_each_step(tmp_path):
    png = make_png(tmp_path / "frame.png")
    with HTTPRecorder(Reply(201, {"Content-Type": "application/json"}, b'{"id": "abc", "status": "starting"}')) as api:
        out = pipeline("send", "--device", "cam-1", "--path", "/images", "--content-type", "image/png",
                       str(tmp_path / "frame.png"), "--override", f"https://api.replicate.com={api.url('')}",
                       env={"REPLICATE_TOKEN": f"Bearer {SECRET_TOKEN}"})
        assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
        assert len(api.requests) == 1
        req = api.requests[0]
    text = out.stdout.decode()
    for step in ("png", "url", "embed", "create-payload", "predict"):
        assert step in text
    assert "delivered" in text and "HTTP 201" in text
    assert SECRET_TOKEN not in text and SECRET_TOKEN not in out.stderr.decode()
    assert req.path == "/v1/predictions"
    assert req.headers["Authorization"] == f"Bearer {SECRET_TOKEN}"
    assert req.headers["Ce-Source"] == "cam-1"
    body = json.loads(req.body)
    assert body["version"] == "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"
    prefix = "data:image/png;base64,"
    assert body["input"]["image"].startswith(prefix)
    assert base64.b64decode(body["input"]["image"][len(prefix):]) == png


def test_send_reports_a_permanent_failure_as_a_dead_letter(tmp_path):
    make_png(tmp_path / "frame.png")
    with HTTPRecorder(Reply(401, {"Content-Type": "application/json"}, b'{"detail": "bad token"}')) as api:
        out = pipeline("send", "--device", "cam-1", "--path", "/images", str(tmp_path / "frame.png"),
                       "--override", f"https://api.replicate.com={api.url('')}",
                       env={"REPLICATE_TOKEN": f"Bearer {SECRET_TOKEN}"})
    assert out.returncode == 1
    assert "dead letter" in out.stdout.decode() and "401" in out.stdout.decode()
    assert SECRET_TOKEN not in out.stdout.decode() + out.stderr.decode()


def test_send_says_when_no_pipeline_matches(tmp_path):
    out = pipeline("send", "--device", "d", "--path", "/nowhere", "-", stdin=b"{}",
                   env={"REPLICATE_TOKEN": "Bearer x"})
    assert out.returncode == 1
    assert "no pipeline matched" in out.stdout.decode()


def test_send_with_a_broken_pipeline_file_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter:\n  path: /x\nsteps:\n  - name: a\n    transformer: {type: json-pach}\n")
    out = pipeline("send", "--pipelines", str(bad), "--path", "/x", "-", stdin=b"{}")
    assert out.returncode == 2
    err = out.stderr.decode()
    assert f"{bad}:5:" in err and "json-patch" in err
    assert "Traceback" not in err


def test_run_the_whole_chain_and_account_for_every_frame(tmp_path):
    out = pipeline("run", "--devices", "2", "--duration", "12", "--interval", "1", "--http-port", "0",
                   "--coap-port", "0", "--data", str(tmp_path / "data"), timeout=150)
    text = out.stdout.decode()
    assert out.returncode == 0, text + out.stderr.decode()[-3000:]
    assert "every frame accounted for" in text
    assert "Caption: " in text
    sent = int(text.split("frames: ")[1].split(" sent")[0])
    assert sent >= 4  # two cameras, about one frame a second each, for 12 s
