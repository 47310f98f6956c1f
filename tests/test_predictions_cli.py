"""The service's command line (``python -m predictions_service``, ``pipeline predictions``) and settings."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from photos import photo
from PIL import Image

from predictions_service import Settings, StartupError, blip, running
from tests.serve_process import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
VERSION = blip.VERSION


def coffee_data_url() -> str:
    buf = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_settings_need_a_token():
    with pytest.raises(ValueError, match="token"):
        Settings()
    with pytest.raises(ValueError, match="whsec_"):
        Settings(tokens=("t",), webhook_secret="plain")
    with pytest.raises(ValueError, match="fault kinds"):
        Settings(tokens=("t",), fault_kinds=("boom",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_serves_until_terminated(classifier, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "predictions_service",
            "--port",
            str(port),
            "--token",
            "cli-token",
            "--model-dir",
            str(classifier.path.parent),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", 20)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/predictions",
            headers={"Authorization": "Token cli-token", "Prefer": "wait"},
            json={"version": VERSION, "input": {"image": coffee_data_url()}},
            timeout=20,
        )
        assert r.json()["output"].startswith("Caption: espresso")
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert b"Traceback" not in proc.stderr.read()


def test_serve_without_a_token_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREDICTIONS_API_TOKENS"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "predictions_service", "--port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "at least one API token" in out.stderr


def test_pipeline_predictions_build_model(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["predictions", "build-model", "--model-dir", str(tmp_path)]) == 0
    assert "0 missing, 0 unexpected" in capsys.readouterr().out
    assert (tmp_path / "efficientnet-lite0-v1.onnx").is_file()


async def test_startup_failure_raises_instead_of_exiting(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = Settings(port=0, tokens=("t",), model_dir=blocker / "models", log_level="critical")
    with pytest.raises(StartupError, match=r"failed to start: .*Not a directory"):
        async with running(settings):
            pass


def test_serve_reports_a_model_dir_it_cannot_use(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "predictions_service",
            "--port",
            "0",
            "--token",
            "t",
            "--log-level",
            "critical",
            "--model-dir",
            str(blocker / "models"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "failed to start" in out.stderr and "Traceback" not in out.stderr


def test_the_service_never_imports_the_router_or_torch():
    code = (
        "import sys, predictions_service, predictions_service.app, predictions_service.cli, "
        "predictions_service.model_build\n"
        "banned = {'pipelines', 'transformers', 'destinations', 'torch'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
