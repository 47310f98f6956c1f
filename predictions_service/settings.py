"""Settings of the local predictions service (one frozen dataclass, built by the CLI or by callers).

    from predictions_service import Settings, create_app
    app = create_app(Settings(tokens=("r8_local",), port=8008))

``tokens`` must hold at least one API token unless ``allow_anonymous`` is set (then any request is
served, which only makes sense on loopback). ``webhook_secret`` defaults to a fresh random
``whsec_...`` value per process; pass one to keep it stable across restarts.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

FAULT_KINDS = ("429", "500", "503", "slow")


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def default_model_dir() -> Path:
    """``$IOT_PIPELINES_MODEL_DIR``, else ``$XDG_CACHE_HOME/iot-pipelines``, else ``~/.cache/...``."""
    if env := os.environ.get("IOT_PIPELINES_MODEL_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "iot-pipelines"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8008  # 0 picks a free port (see ``running()``)
    tokens: tuple[str, ...] = ()
    allow_anonymous: bool = False
    webhook_secret: str = field(default_factory=new_webhook_secret)
    # Replicate's documented limits; a token bucket per API token, so short bursts pass.
    create_rate_per_minute: int = 600
    other_rate_per_minute: int = 3000
    # Fault injection for tests of clients: each /v1 call fails with this probability.
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("429", "500", "503", "slow")
    fault_slow_seconds: float = 2.0
    fault_seed: int | None = None
    model_dir: Path | None = None  # None: default_model_dir()
    workers: int = 1  # concurrent model runs; each run is a few ms of CPU
    # A lone Prefer: wait prediction of a small image may run on the event loop's own thread
    # (runner.py): only where the service has its loop to itself (`pipeline predictions serve`),
    # never when it shares the router's loop (`pipeline run`), whose devices must not wait for it.
    inline_runs: bool = False
    prediction_timeout: float = 1800.0  # Replicate's 30 minutes
    max_body_bytes: int = 10_000_000  # bigger JSON bodies get 413 (Replicate: use the Files API)
    max_image_bytes: int = 10_000_000  # cap for images fetched from http(s) URLs
    image_fetch_timeout: float = 10.0
    # Delays between retries of the terminal webhook: about a minute in total, as Replicate does.
    webhook_retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
    webhook_timeout: float = 10.0
    webhook_throttle_seconds: float = 0.5
    max_predictions: int = 10_000  # in memory; the oldest finished ones are forgotten first
    data_retention_seconds: float = 3600.0  # then input/output/logs are removed, as on Replicate
    public_base_url: str | None = None  # for urls.get etc.; default: the URL the client used
    # URL inputs from loopback/private/link-local addresses are refused unless this is set.
    allow_private_urls: bool = False
    # Files API: where uploads go (None: a fresh temporary directory, removed at shutdown), the
    # per-file cap (Replicate's 100 MiB), the total disk the store may use, and how long files live.
    files_dir: Path | None = None
    max_file_bytes: int = 100 << 20
    max_files_total_bytes: int = 2 << 30
    file_ttl_seconds: float = 86400.0  # Replicate's files expire after 24 h
    # Data-URL inputs bigger than this are moved to the file store at create time (the input then
    # echoes the file's URL); Replicate recommends data URLs only up to 256 KB.
    spill_input_bytes: int = 256 << 10
    # Total bytes of inputs kept in memory by held predictions; past it, the inputs of the oldest
    # finished predictions are dropped, and with none left to drop, creates get a 503.
    max_held_input_bytes: int = 128 << 20
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.tokens and not self.allow_anonymous:
            raise ValueError("give at least one API token (--token), or allow anonymous access explicitly")
        if any(not t or any(c.isspace() for c in t) for t in self.tokens):
            raise ValueError("API tokens must be non-empty and contain no whitespace")
        if not self.webhook_secret.startswith("whsec_"):
            raise ValueError("webhook secret must look like whsec_<base64>")
        try:
            base64.b64decode(self.webhook_secret[6:], validate=True)
        except ValueError as exc:
            raise ValueError("webhook secret must be whsec_ followed by base64") from exc
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        unknown = set(self.fault_kinds) - set(FAULT_KINDS)
        if unknown or not self.fault_kinds:
            raise ValueError(f"fault kinds must be some of {', '.join(FAULT_KINDS)}; got {sorted(unknown)}")
        if self.create_rate_per_minute < 1 or self.other_rate_per_minute < 1:
            raise ValueError("rate limits must be at least 1 per minute")
        if self.data_retention_seconds <= 0 or self.max_predictions < 1:
            raise ValueError("data retention must be positive and max_predictions at least 1")
        if self.max_file_bytes < 1 or self.max_files_total_bytes < 1 or self.max_held_input_bytes < 1:
            raise ValueError("file and input caps must be positive")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")

    def resolved_model_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else default_model_dir()
