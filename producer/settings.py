"""Configuration for producers and workers: defaults < TOML file < AUDIOQ_* environment.

One flat pydantic model, so every setting has exactly one environment variable: the field
name upper-cased with the ``AUDIOQ_`` prefix (``s3_endpoint_url`` ↔ ``AUDIOQ_S3_ENDPOINT_URL``).
The TOML file (``--config`` or ``AUDIOQ_CONFIG``) may group keys in tables; table names are
only for reading, keys are the field names. Storage credentials are deliberately absent:
boto3 finds them in its usual chain (environment, profile, instance role), never in a job.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "AUDIOQ_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Redis and queues
    redis_url: str = "redis://127.0.0.1:6379/0"
    queues: list[str] = Field(default_factory=lambda: ["high", "default", "low"])
    default_queue: str = "default"
    result_ttl: int = Field(7 * 24 * 3600, description="seconds a finished job is kept")
    failure_ttl: int = Field(30 * 24 * 3600, description="seconds a failed job is kept")

    # S3-compatible storage (credentials come from boto3's own chain)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str = Field("auto", pattern="^(auto|path|virtual)$")
    s3_profile: str | None = None
    s3_connect_timeout: float = 10.0
    s3_read_timeout: float = 60.0

    # Worker: model and limits
    model: str | None = Field(None, description="checkpoint directory or hub repo id")
    max_audio_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_audio_seconds: float = Field(30.0, gt=0)
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(2048, ge=1)
    job_timeout_base: float = Field(120.0, gt=0, description="seconds, plus per audio second")
    job_timeout_per_audio_second: float = Field(4.0, ge=0)
    storage_retries: int = Field(3, ge=0)
    storage_retry_backoff: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0])
    heartbeat_interval: float = Field(15.0, gt=0, description="worker liveness beat during jobs")
    lost_after: float = Field(60.0, gt=0, description="a running job with no beat this long is lost")
    lost_job_retries: int = Field(1, ge=0)
    temp_dir: str | None = None

    def job_budget(self, audio_seconds: float | None = None) -> float:
        """Seconds a job may run: the base plus a share per audio second.

        Without a length (the audio is not decoded yet) the longest allowed audio stands in.
        """
        seconds = self.max_audio_seconds if audio_seconds is None else audio_seconds
        return self.job_timeout_base + self.job_timeout_per_audio_second * seconds

    @property
    def hard_timeout(self) -> int:
        """RQ's backstop deadline: the longest job the settings allow, plus a minute."""
        return math.ceil(self.job_budget()) + 60


def _flatten(table: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[key] = value
    return flat


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if field.annotation in (list[str], list[float]):
            found[name] = json.loads(raw) if raw.lstrip().startswith("[") else raw.split(",")
        else:
            found[name] = raw
    return found


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build the settings; explicit ``overrides`` (e.g. CLI flags) win over everything."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            values.update(_flatten(tomllib.load(f)))
    values.update(_from_env(environ))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(values)
