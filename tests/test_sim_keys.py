"""Simulated fleets get fresh random keys (issue 14, finding 2): before, ``pipeline run`` derived
``cam-01@demo``'s key from the default ``--seed 1``, the same on every install."""

from __future__ import annotations

import yaml

from tests.serve_process import cli


def keys(path) -> list[str]:
    return [d["psk"] for d in yaml.safe_load(path.read_text())["devices"]]


def test_pipeline_sim_keys_are_fresh_unless_a_key_seed_is_given(tmp_path):
    a, b, c, d = (tmp_path / f"{n}.yaml" for n in "abcd")
    for path, extra in ((a, ()), (b, ()), (c, ("--key-seed", "7")), (d, ("--key-seed", "7"))):
        out = cli("sim", "--devices", "3", "--seed", "1", "--registry", str(path), "--registry-only", *extra)
        assert out.returncode == 0, out.stderr
        assert path.stat().st_mode & 0o777 == 0o600
    assert not set(keys(a)) & set(keys(b))          # same --seed, different keys
    assert keys(c) == keys(d) and not set(keys(c)) & set(keys(a))


def test_pipeline_run_writes_fresh_keys_on_every_start(tmp_path):
    """``pipeline run`` with the default seed, started twice: different registries."""
    seen = []
    for _ in range(2):
        out = cli("run", "--data", str(tmp_path / "data"), "--devices", "2", "--duration", "0.5", "--drain", "0",
                  "--http-port", "0", "--coap-port", "0", "--plain-output", "--interval", "60")
        assert (tmp_path / "data" / "devices.yaml").exists(), out.stderr[-2000:]
        seen.append(keys(tmp_path / "data" / "devices.yaml"))
    assert not set(seen[0]) & set(seen[1])
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
