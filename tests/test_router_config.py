"""``pipeline serve --config router.yaml``: the file, its problems as FILE:LINE:COL, flags over
it, ``pipeline validate`` on it, and ``--log-format json``. Real ``pipeline serve`` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pipeline_texts import KEEP_READINGS

from pipelines.cli import main
from pipelines.router_config import is_router_config, load_router_config

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = KEEP_READINGS + """\
  bad:
    filter: {path: /bad, content_type: application/json}
    steps:
      - name: patch
        transformer: {type: json-patch, version: v1, parameters: {patch: '[{"op": "add", "path": "/x", "value": 1}]'}}
"""


def serve(args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the cwd
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready http://"):
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[1]


def test_the_shipped_router_yaml_is_valid_and_recognised():
    assert is_router_config(ROOT / "router.yaml")
    assert not is_router_config(ROOT / "pipeline.yaml")
    config = load_router_config(ROOT / "router.yaml")
    assert config.problems == []
    assert config.values["http_port"] == 8080 and config.pipelines == [ROOT / "pipeline.yaml"]
    assert config.values["store"] == str(ROOT / "pipeline-data" / "store.db")


def test_problems_are_reported_at_file_line_col_and_nothing_starts(tmp_path, capsys):
    bad = tmp_path / "router.yaml"
    bad.write_text("store: s.db\nhttp:\n  prot: 80\n  port: 99999\npipelines: [missing.yaml]\n"
                   "limits: {keep_log_rows: lots}\nlog: {format: xml}\nwatch: maybe\n")
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{bad}:3:3: unknown key 'prot' in 'http'; did you mean 'port'? "
        "(allowed: host, port, ingest, public_url, webhook_secret)",
        f"{bad}:4:9: http.port must be a port number from 0 to 65535 (0: any free port), not 99999",
        f"{bad}:5:13: pipelines: 'missing.yaml' does not exist (relative to {tmp_path})",
        f"{bad}:6:25: limits.keep_log_rows must be a number of rows (0 or more) or 'all', not 'lots'",
        f"{bad}:7:15: log.format must be text or json, not 'xml'",
        f"{bad}:8:8: watch must be true or false, not 'maybe'",
        "6 problems in 1 file",
    ]
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{bad}:4:9: http.port must be" in proc.stderr and "nothing started" in proc.stderr
    assert not (tmp_path / "s.db").exists()
    (tmp_path / "empty.yaml").write_text("store: [1, 2]\nhttp: 3\n")
    assert main(["validate", str(tmp_path / "empty.yaml")]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{tmp_path / 'empty.yaml'}:1:8: store must be a non-empty string, not a list",
        f"{tmp_path / 'empty.yaml'}:2:7: 'http' must be a mapping, not a number"]


def test_serve_runs_from_the_file_flags_override_it_and_logs_json(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "router.yaml").write_text(
        "store: from-file.db\npipelines: p.yaml\nhttp: {host: 127.0.0.1, port: 0, ingest: true}\n"
        "log: {level: INFO, format: json}\nwatch: false\n")
    proc, url = serve(["--config", "router.yaml", "--store", "from-flag.db"], cwd=tmp_path)
    try:
        r = httpx.post(url + "/v1/ingest/demo/meter-1/readings", content=b'{"n": 1}',
                       headers={"content-type": "application/json", "message-id": "m-1"})
        assert r.status_code == 202  # http.ingest from the file
        r = httpx.post(url + "/v1/ingest/demo/meter-2/bad", content=b'not json at all',  # dead letter
                       headers={"content-type": "application/json", "message-id": "m-2"})
        assert r.status_code == 202
        deadline = time.monotonic() + 20
        while not httpx.get(url + "/v1/stream").json():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while "pipeline_runs_dead_total 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert (tmp_path / "from-flag.db").exists() and not (tmp_path / "from-file.db").exists()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    dropped = [e for e in lines if "dead letters" in e["message"] and e.get("message_id") == "m-2"]
    assert dropped, lines
    assert dropped[0]["device"] == "meter-2" and dropped[0]["pipeline"] == "bad"
    assert dropped[0]["step"] == "patch" and dropped[0]["level"] == "WARNING"


def test_coap_limits_and_certificates_map_to_the_serve_options(tmp_path):
    (tmp_path / "router.pem").write_text("x")
    (tmp_path / "router.yaml").write_text(
        "coap: {dtls_port: 0, rate_limit: 50, rate_burst: 500, dtls_cert: router.pem, dtls_key: router.pem}\n")
    config = load_router_config(tmp_path / "router.yaml")
    assert config.problems == []
    assert config.values["rate_limit"] == 50.0 and config.values["rate_burst"] == 500.0
    assert config.values["dtls_cert"] == str(tmp_path / "router.pem")
    (tmp_path / "bad.yaml").write_text("coap: {rate_limit: -1, rate_burst: 0}\n")
    assert [str(p) for p in load_router_config(tmp_path / "bad.yaml").problems] == [
        f"{tmp_path / 'bad.yaml'}:1:20: coap.rate_limit must be requests per second per device "
        "(0 or more; 0: no limit), not -1",
        f"{tmp_path / 'bad.yaml'}:1:36: coap.rate_burst must be a number of requests, 1 or more, not 0"]
