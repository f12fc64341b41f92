"""Shared fixtures: a real Redis database, a real S3 HTTP server, audio made on the spot.

Tests use their own Redis database (``AUDIOQ_TEST_REDIS_URL``, default db 13 on the local
server) and flush it before and after each test that asks for it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import boto3
import numpy as np
import pytest
import redis as redis_lib


TEST_REDIS_URL = os.environ.get("AUDIOQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
def redis_url():
    conn = redis_lib.Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except redis_lib.ConnectionError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"no redis-server answers at {TEST_REDIS_URL}: {exc}")
    conn.flushdb()
    yield TEST_REDIS_URL
    conn.flushdb()
    conn.close()


@pytest.fixture
def redis_conn(redis_url):
    conn = redis_lib.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over real HTTP on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (and audioq's settings) at the moto server with dummy credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AUDIOQ_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AUDIOQ_S3_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env, request):
    """A fresh bucket on the moto server; returns (boto3 client, bucket name)."""
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    readable = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"aq-{readable}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"
    client.create_bucket(Bucket=name)
    yield client, name
    for obj in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


def make_tone(seconds: float, sr: int = 16000, freq: float = 440.0, channels: int = 1,
              seed: int = 0) -> np.ndarray:
    """A tone with a little noise: deterministic, non-silent, shaped (frames, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


class OutOfMemoryOnce:
    """A real part of the model that runs out of memory once, on its first call that ``refuses``.

    MLX's memory limit is not enforced on the CPU, so the part itself raises what MLX raises
    there when an allocation fails; every other call is the real one.
    """

    def __init__(self, part, refuses):
        self.part = part
        self.refuses = refuses
        self.failures = 0

    def __call__(self, *args, **kwargs):
        if not self.failures and self.refuses(*args, **kwargs):
            self.failures += 1
            raise MemoryError("out of memory: the batch does not fit (injected)")
        return self.part(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.part, name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a random-weight checkpoint with the real architecture, built once per kind."""
    from make_tiny_checkpoint import build_checkpoint

    built: dict[tuple, Path] = {}

    def get(preset: str = "e2b", **options) -> Path:
        key = (preset, tuple(sorted(options.items())))
        if key not in built:
            name = "-".join([preset] + [f"{k}{v}" for k, v in sorted(options.items())])
            built[key] = build_checkpoint(tmp_path_factory.mktemp(name), preset, **options)
        return built[key]

    return get


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The real engine on the tiny e2b checkpoint, loaded once per test module (~0.01 s)."""
    from worker.gemma4.engine import Engine

    return Engine.load(str(tiny_checkpoint()))


_REPORT_LINES: list[str] = []


@pytest.fixture(scope="session")
def report():
    """Tests call ``report(line)`` for numbers worth reading; they print after the run."""
    return _REPORT_LINES.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT_LINES:
        terminalreporter.section("audioq measurements")
        for line in _REPORT_LINES:
            terminalreporter.write_line(line)
