"""The service's command line (``python -m predictions_service``, ``pipeline predictions``) and settings."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from predictions_service import Settings, blip
from predictions_service.model import Classifier, ensure_model

ROOT = Path(__file__).resolve().parent.parent
VERSION = blip.VERSION


def photo(name: str) -> np.ndarray:
    """A real photo: the copy shipped in device_sim/data, else scikit-image's original."""
    path = ROOT / "device_sim" / "data" / f"{name}.jpg"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    skdata = pytest.importorskip(
        "skimage.data", reason="test photos come from device_sim/data or scikit-image"
    )
    return getattr(skdata, name)()


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Classifier:
    return Classifier(ensure_model(tmp_path_factory.getbasetemp() / "predictions-model"))


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
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(0.05)
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
