"""Unit tests of the CoAP ingest's parts: device registry, rate limiter, Block1 assembler."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.devices import DeviceEntry, DeviceRegistry, DeviceRegistryError, decode_psk
from pipelines.ingest.coap import content_type_for
from pipelines.ingest.coap_blockwise import (
    BAD_REQUEST,
    CONFLICT,
    REQUEST_ENTITY_INCOMPLETE,
    REQUEST_ENTITY_TOO_LARGE,
    SERVICE_UNAVAILABLE,
    Block1Assembler,
    Complete,
    Continue,
    Refused,
)
from pipelines.ingest.rate_limit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "devices.yaml"
    p.write_text(text)
    return p


# -- registry ------------------------------------------------------------------------------

def test_registry_loads_defaults_refs_and_hex(tmp_path):
    p = write(tmp_path, """\
project_id: demo
devices:
  - id: cam-01
    psk: "text-key"
  - id: cam-02
    project_id: other
    psk: "0x00ff10"
  - id: cam-03
    psk: "${CAM03}"
  - id: cam-04
    psk: "$MISSING"
  - id: cam-05
""")
    reg = DeviceRegistry.load(p, resolver={"CAM03": "from-vault"}.get)
    assert reg.by_identity("cam-01@demo").psk == b"text-key"
    assert reg.by_identity("cam-02@other").psk == b"\x00\xff\x10"
    assert reg.by_identity("cam-02@demo") is None
    assert reg.by_identity("cam-03@demo").psk == b"from-vault"
    assert reg.by_identity("cam-03@demo").psk_source == "$CAM03"
    assert reg.by_identity("cam-04@demo").psk is None  # unresolvable: DTLS refuses the device
    assert reg.by_identity("cam-05@demo").psk is None
    assert reg.find_device("cam-02").project_id == "other"
    assert reg.lookup("demo", "cam-01").line == 3
    assert "text-key" not in repr(reg.by_identity("cam-01@demo"))


def test_registry_resolves_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("KEY_FROM_ENV", "env-key")
    reg = DeviceRegistry.load(write(tmp_path, "devices:\n  - id: a\n    psk: $KEY_FROM_ENV\n"))
    assert reg.default_project == "default"
    assert reg.by_identity("a@default").psk == b"env-key"


@pytest.mark.parametrize(("text", "error"), [
    ("devices:\n  - id: a\n  - id: a\n", r"devices.yaml:3: device a@default is listed twice"),
    ("devices:\n  - id: 'bad id'\n", r"devices.yaml:2: device id must be"),
    ("devices:\n  - id: a\n    psk: 0xzz\n", r"devices.yaml:2: device a: psk \(inline\): key starts with 0x"),
    ("devices:\n  - id: a\n    key: x\n", r"devices.yaml:2: unknown key\(s\) \['key'\]"),
    ("devices: [\n", r"devices.yaml:\d+: not valid YAML"),
    ("- a\n- b\n", r"devices.yaml:1: the registry must be a mapping"),
    ("devices: {a: 1}\n", r"'devices' must be a list"),
    ("project_id: 'x y'\n", r"project_id must be a plain name"),
    ("devices:\n  - id: a\n    psk: ''\n", r"psk must be a non-empty string"),
])
def test_registry_errors_name_file_and_line(tmp_path, text, error):
    with pytest.raises(DeviceRegistryError, match=error):
        DeviceRegistry.load(write(tmp_path, text))


def test_registry_error_never_shows_the_key(tmp_path):
    with pytest.raises(DeviceRegistryError) as exc:
        DeviceRegistry.load(write(tmp_path, "devices:\n  - id: a\n    psk: 0xsecretsecret\n"))
    assert "secretsecret" not in str(exc.value)


def test_registry_missing_file(tmp_path):
    with pytest.raises(DeviceRegistryError, match="cannot read device registry"):
        DeviceRegistry.load(tmp_path / "nope.yaml")


def test_registry_refresh_picks_up_changes_and_keeps_old_on_error(tmp_path):
    import os
    p = write(tmp_path, "devices:\n  - id: a\n    psk: k1\n")
    reg = DeviceRegistry.load(p)
    assert reg.refresh() is False
    p.write_text("devices:\n  - id: a\n    psk: k2\n  - id: b\n    psk: k3\n")
    os.utime(p, (1, 12345))
    assert reg.refresh() is True
    assert reg.by_identity("a@default").psk == b"k2" and len(reg) == 2
    p.write_text("devices: [\n")
    os.utime(p, (1, 23456))
    with pytest.raises(DeviceRegistryError):
        reg.refresh()
    assert reg.by_identity("b@default").psk == b"k3"


def test_decode_psk_and_identity():
    assert decode_psk("0xABcd") == b"\xab\xcd"
    assert decode_psk("0x") == b"0x"
    assert decode_psk("plain") == b"plain"
    assert DeviceEntry("cam", "proj").identity == "cam@proj"


def test_content_type_map():
    assert content_type_for(None) == ("application/octet-stream", {})
    assert content_type_for(23) == ("image/png", {})
    assert content_type_for(60) == ("application/cbor", {})
    assert content_type_for(11050) == ("application/octet-stream", {"coap_content_format": 11050})


# -- rate limiter ----------------------------------------------------------------------------

def test_token_bucket_bursts_then_refills():
    clock = Clock()
    rl = RateLimiter(rate=20, burst=20, clock=clock)
    assert [rl.take("d") for _ in range(20)] == [0.0] * 20
    wait = rl.take("d")
    assert wait == pytest.approx(0.05)
    assert rl.take("other") == 0.0  # per key
    clock.now += 0.1
    assert rl.take("d") == 0.0 and rl.take("d") == 0.0
    assert rl.take("d") > 0


def test_rate_limiter_disabled_and_bounded():
    assert RateLimiter(rate=0).take("x") == 0.0
    rl = RateLimiter(rate=1, burst=1, max_keys=3, clock=Clock())
    for k in range(10):
        rl.take(k)
    assert len(rl) == 3


# -- Block1 assembler ------------------------------------------------------------------------

def test_assembler_reassembles_and_releases():
    asm = Block1Assembler(max_body=10_000, clock=Clock())
    assert asm.feed("k", 0, True, 0, b"a" * 16) == Continue(0, 0)
    assert asm.feed("k", 1, True, 0, b"b" * 16) == Continue(1, 0)
    out = asm.feed("k", 2, False, 0, b"c")
    assert isinstance(out, Complete) and out.body == b"a" * 16 + b"b" * 16 + b"c" and out.blocks == 3
    assert asm.held_bytes == 33 and len(asm) == 0
    asm.release(len(out.body))
    assert asm.held_bytes == 0


def test_assembler_negotiates_smaller_blocks_by_offset():
    asm = Block1Assembler(max_szx=2, clock=Clock())
    assert asm.feed("k", 0, True, 6, b"x" * 1024) == Continue(0, 2)
    # the client re-indexes to 64-byte blocks: 1024 / 64 = 16
    assert asm.feed("k", 16, True, 2, b"y" * 64) == Continue(16, 2)
    out = asm.feed("k", 17, False, 2, b"z")
    assert isinstance(out, Complete) and len(out.body) == 1024 + 64 + 1


def test_assembler_refusals():
    clock = Clock()
    asm = Block1Assembler(max_body=100, max_held_bytes=10_000, expiry=10, clock=clock)
    assert asm.feed("k", 1, True, 0, b"a" * 16).code == REQUEST_ENTITY_INCOMPLETE
    out = asm.feed("k", 0, True, 0, b"a" * 16, size1=101)
    assert isinstance(out, Refused) and (out.code, out.size1) == (REQUEST_ENTITY_TOO_LARGE, 100)
    asm.feed("k", 0, True, 0, b"a" * 16)
    assert asm.feed("k", 0, True, 0, b"b" * 16, token=b"other").code == CONFLICT
    clock.now += 6  # a stale upload may be restarted
    assert isinstance(asm.feed("k", 0, True, 0, b"b" * 16, token=b"other"), Continue)
    assert asm.feed("k", 1, True, 0, b"short").code == BAD_REQUEST
    assert asm.feed("k", 0, True, 0, b"a" * 16, content_format=0) == Continue(0, 0)
    assert asm.feed("k", 1, True, 0, b"a" * 16, content_format=50).code == REQUEST_ENTITY_INCOMPLETE
    for n in range(6):
        out = asm.feed("k2", n, True, 0, b"q" * 16)
    assert isinstance(out, Continue)
    out = asm.feed("k2", 6, True, 0, b"q" * 16)
    assert out.code == REQUEST_ENTITY_TOO_LARGE and asm.held_bytes == 0
    asm.feed("k3", 0, True, 0, b"q" * 16)
    clock.now += 11
    assert asm.sweep() == 1 and asm.held_bytes == 0


def test_assembler_memory_cap():
    asm = Block1Assembler(max_held_bytes=40, busy_retry_after=3, clock=Clock())
    asm.feed("a", 0, True, 0, b"a" * 16)
    asm.feed("b", 0, True, 0, b"b" * 16)
    out = asm.feed("c", 0, True, 0, b"c" * 16)
    assert isinstance(out, Refused) and (out.code, out.max_age) == (SERVICE_UNAVAILABLE, 3)
    assert asm.held_bytes == 32


def test_assembler_rejects_bad_max_szx():
    with pytest.raises(ValueError, match="max_szx"):
        Block1Assembler(max_szx=7)


# -- pipeline devices ------------------------------------------------------------------------

def test_cli_devices_add_and_list(tmp_path, capsys):
    from pipelines.cli import main

    reg = tmp_path / "devices.yaml"
    assert main(["devices", "add", "cam-01", "--registry", str(reg), "--project", "demo"]) == 0
    out = capsys.readouterr().out
    key = out.split("key (shown once; give it to the device): ")[1].strip()
    assert len(key) == 32
    assert main(["devices", "add", "cam-02", "--registry", str(reg), "--psk-ref", "CAM02"]) == 0
    assert main(["devices", "add", "cam-03", "--registry", str(reg), "--psk", "123456"]) == 0
    loaded = DeviceRegistry.load(reg, resolver=lambda name: None)
    assert loaded.by_identity("cam-01@demo").psk == key.encode()
    assert loaded.by_identity("cam-02@demo").psk is None
    assert loaded.by_identity("cam-03@demo").psk == b"123456"  # quoted: still text, not a number
    assert reg.stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    assert main(["devices", "list", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "cam-01@demo  key: inline" in out and "$CAM02" in out and key not in out
    assert main(["devices", "add", "cam-01", "--registry", str(reg)]) == 1
    assert "listed twice" in capsys.readouterr().err
    assert len(DeviceRegistry.load(reg)) == 3  # the refused add changed nothing


def test_keep_alive_filter_reads_the_formatted_message_and_any_msg_type():
    import logging

    from pipelines.ingest.coap import LOGGER_NAME

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger(LOGGER_NAME)
    handler = Collect()
    log.addHandler(handler)
    try:
        # the keep-alive text arriving as an argument is still recognised
        log.warning("%s", "Received a message with code EMPTY and type NON, ignoring")
        # a msg that is not a str (an exception object) must not crash the logging call
        log.warning(ValueError("odd"))
        log.warning("Received a message with code %s", "GET")  # not a keep-alive: kept
    finally:
        log.removeHandler(handler)
    assert seen == ["odd", "Received a message with code GET"]
