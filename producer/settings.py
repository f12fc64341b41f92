"""Configuration for producers and workers: defaults < TOML file < AUDIOQ_* environment.

One flat pydantic model, so every setting has exactly one environment variable: the field
name upper-cased with the ``AUDIOQ_`` prefix (``s3_endpoint_url`` ↔ ``AUDIOQ_S3_ENDPOINT_URL``).
The TOML file (``--config`` or ``AUDIOQ_CONFIG``) may group keys in tables; table names are
only for reading, keys are the field names. Storage credentials are deliberately absent:
boto3 finds them in its usual chain (environment, profile, instance role), never in a job.

List settings come from the environment as JSON (``["high", "low"]``) or comma-separated
(``high, low``; items are trimmed). Unknown TOML keys are errors; an unknown ``AUDIOQ_*``
variable (a typo) is logged as a warning, since the environment holds foreign names too.
Settings that must agree with each other are checked at load (``Settings._consistent``),
so a producer or worker with a contradictory configuration stops before it does anything.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "AUDIOQ_"
# AUDIOQ_* variables that are not settings: the config file path, the CLI's traceback
# switch, and anything AUDIOQ_TEST_* (the test-suite's own).
OTHER_ENV = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "DEBUG"})
OTHER_ENV_PREFIXES = (ENV_PREFIX + "TEST_",)

log = logging.getLogger("audioq.settings")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Redis and queues
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_tls_ca_file: str | None = Field(None, description="CA of the server's certificate (rediss://)")
    redis_tls_cert_file: str | None = Field(None, description="client certificate, for tls-auth-clients")
    redis_tls_key_file: str | None = Field(None, description="the client certificate's private key")
    queues: list[str] = Field(default_factory=lambda: ["high", "default", "low"])
    default_queue: str = "default"
    result_ttl: int = Field(7 * 24 * 3600, ge=1, description="seconds a finished job is kept")
    failure_ttl: int = Field(30 * 24 * 3600, ge=1, description="seconds a failed job is kept")

    # S3-compatible storage (credentials come from boto3's own chain)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str = Field("auto", pattern="^(auto|path|virtual)$")
    s3_profile: str | None = None
    s3_connect_timeout: float = Field(10.0, gt=0)
    s3_read_timeout: float = Field(60.0, gt=0)
    s3_attempt_timeout: float = Field(120.0, gt=0, description="seconds for one whole storage attempt")
    allowed_buckets: list[str] = Field(default_factory=list, description="buckets jobs may name; empty: any")
    allow_file_uris: bool = Field(True, description="whether jobs may name file:// paths on the worker")
    file_roots: list[str] = Field(default_factory=list, description="directories file:// may reach; empty: any")

    # Worker: model and limits
    model: str | None = Field(None, description="checkpoint directory or hub repo id")
    max_audio_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_audio_seconds: float = Field(4 * 3600.0, gt=0, description="longer audio is audio_too_long")
    max_chunks: int = Field(2000, ge=1, description="a recording planned into more is audio_too_long")
    # task=prompt on audio longer than one chunk: the question is answered in one text-only
    # turn over the timestamped transcript; a turn longer than this many tokens is refused.
    answer_context_tokens: int = Field(65536, ge=1)
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(2048, ge=1)
    max_prompt_chars: int = Field(4000, ge=1, description="characters of a prompt task's prompt")
    max_language_chars: int = Field(64, ge=1, description="characters of language and target_language")
    max_request_bytes: int = Field(65536, ge=1024, description="bytes of a whole request as JSON, metadata included")
    max_prompt_tokens: int = Field(1024, ge=1, description="tokens of the instruction the model reads")
    job_timeout_base: float = Field(120.0, gt=0, description="seconds, plus per audio second")
    job_timeout_per_audio_second: float = Field(4.0, ge=0)
    storage_retries: int = Field(3, ge=0)
    storage_retry_backoff: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0])
    heartbeat_interval: float = Field(15.0, gt=0, description="worker liveness beat during jobs")
    lost_after: float = Field(60.0, gt=0, description="a running job with no beat this long is lost")
    lost_job_retries: int = Field(1, ge=0)
    temp_dir: str | None = None

    # Worker: chunk plan of long audio (worker/chunk_plan.py; 30 s is the model's window)
    max_chunk_seconds: float = Field(30.0, gt=0, le=30.0)
    min_chunk_seconds: float = Field(3.0, gt=0)
    skip_silence_seconds: float = Field(3.0, gt=0, description="silences this long are not sent to the model")
    silence_floor_db: float = Field(-60.0, le=0, description="dBFS under which audio is a pause at any level")
    # Worker: batching (see docs/design.md, "Several jobs at once")
    batch_max_jobs: int = Field(32, ge=1, description="jobs whose clips run in the engine at once; 1 = one at a time")
    batch_token_budget: int = Field(32768, ge=1, description="KV-cache rows the running clips may hold, in tokens")
    prefetch_jobs: int = Field(4, ge=0, description="jobs fetched and decoded ahead of the engine")
    prefetch_threads: int = Field(8, ge=1, description="threads fetching and decoding them (and writing results)")
    batch_join_jobs: int = Field(8, ge=1, description="while the engine runs, new clips go in this many at a time "
                                 "(one tower call and prefill), or once the first has waited batch_join_wait")
    batch_join_wait: float = Field(0.25, ge=0, description="seconds a clip waits at most for others to join with")
    batch_encode_clips: int | None = Field(None, ge=1, description="clips through the audio tower in one padded "
                                           "call; unset: 64 with CUDA, else 8")
    batch_prefill_tokens: int | None = Field(None, ge=1, description="padded prompt tokens prefilled in one call; "
                                             "unset: 32768 with CUDA, else 8192")
    batch_padding_slack: float | None = Field(None, ge=1.0, description="a tower or prefill call computes at most "
                                              "this many times what its clips need; unset: 1.0 on the CPU, "
                                              "1.25 on Metal, 4.0 with CUDA (where a call's fixed cost "
                                              "outweighs padding)")
    engine_process: bool = Field(True, description="run the model in a child process, so its decode loop does not "
                                 "share an interpreter with the worker's queue and storage threads")
    redis_retry_max_wait: float = Field(2.0, gt=0, description="longest wait between reconnects while Redis is away")

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        """Checks that span fields, so a bad combination fails at load, in producer and worker alike."""
        problems = []
        if not self.queues:
            problems.append("queues must name at least one queue")
        blank = [q for q in self.queues if not q.strip() or q != q.strip()]
        if blank:
            problems.append(f"queue names must not be blank or start/end with spaces: {blank!r}")
        repeated = sorted({q for q in self.queues if self.queues.count(q) > 1})
        if repeated:
            problems.append(f"queues lists {', '.join(repeated)} more than once")
        if self.queues and self.default_queue not in self.queues:
            problems.append(f"default_queue {self.default_queue!r} is not one of queues "
                            f"({', '.join(self.queues)}): no worker would read it")
        negative = [b for b in self.storage_retry_backoff if not b >= 0]  # `not >=` also catches NaN
        if negative:
            problems.append(f"storage_retry_backoff must hold seconds >= 0, not {negative}")
        if self.lost_after < 2 * self.heartbeat_interval:
            problems.append(f"lost_after ({self.lost_after:g} s) must be at least twice heartbeat_interval "
                            f"({self.heartbeat_interval:g} s), or running jobs would be taken for lost")
        relative = [root for root in self.file_roots if not os.path.isabs(root)]
        if relative:
            problems.append(f"file_roots must be absolute paths, not {relative}")
        tls_files = [f for f in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file") if getattr(self, f)]
        if tls_files and not self.redis_url.startswith("rediss://"):
            problems.append(f"{', '.join(tls_files)} set, but redis_url is not rediss:// (TLS files apply to TLS "
                            f"connections only)")
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            problems.append("redis_tls_cert_file and redis_tls_key_file go together (a client certificate and its key)")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            problems.append(f"default_max_new_tokens ({self.default_max_new_tokens}) is above "
                            f"max_new_tokens_limit ({self.max_new_tokens_limit})")
        if self.min_chunk_seconds > self.max_chunk_seconds / 2:
            problems.append(f"min_chunk_seconds ({self.min_chunk_seconds:g} s) must be at most half of "
                            f"max_chunk_seconds ({self.max_chunk_seconds:g} s), or a long span could not be cut")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def job_budget(self, audio_seconds: float | None = None) -> float:
        """Seconds a job may run: the base plus a share per audio second.

        Without a length (the audio is not decoded yet) the longest allowed audio stands in,
        so with 4 h audio allowed RQ's backstop (``hard_timeout``) is about 16 h: it must let
        the longest job finish. A job's own deadline is this budget of its decoded length.
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
            if raw.lstrip().startswith("["):
                found[name] = json.loads(raw)
            else:  # "high, low" is ["high", "low"]; an empty item (a trailing comma) is dropped
                found[name] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            found[name] = raw
    return found


def _warn_unknown_env(environ: dict[str, str]) -> None:
    """A misspelt AUDIOQ_* variable would otherwise be ignored without a word (TOML typos are errors)."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_ENV
    suffixes = sorted(name[len(ENV_PREFIX):] for name in known)
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(OTHER_ENV_PREFIXES):
            continue
        # Compared without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], suffixes, n=1, cutoff=0.7)
        hint = f" (did you mean {ENV_PREFIX + close[0]}?)" if close else ""
        log.warning("audioq: ignoring unknown environment variable %s%s", name, hint)


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build the settings; explicit ``overrides`` (e.g. CLI flags) win over everything."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            values.update(_flatten(tomllib.load(f)))
    _warn_unknown_env(environ)
    values.update(_from_env(environ))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(values)
