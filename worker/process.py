"""The worker process: one per Mac, the model resident, jobs run on the main thread.

``AudioWorker`` is a ``SimpleWorker``: no fork per job, because MLX/Metal state does not
survive a fork, and the model would otherwise load per job. It adds what ``SimpleWorker``
lacks, in one background thread (``Maintenance``) that touches Redis only, never MLX
(MLX streams belong to the main thread):

- the running job's beat key, refreshed every ``heartbeat_interval`` (see ``reaper``);
- the lost-job sweep, in every worker, idle or busy;
- RQ's scheduler for retries with backoff (``storage_unavailable``), run in-thread: RQ's
  own ``with_scheduler`` forks a process, which is unsafe in a process holding Metal state.

Warm shutdown is RQ's: the first SIGTERM/SIGINT lets the current job finish, then the
worker exits 0. A burst worker also waits for jobs in its queues that come due within
the longest retry backoff, so a burst drains its retries instead of leaving them scheduled.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from rq.job import JobStatus
from rq.logutils import setup_loghandlers
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat
from rq.worker import SimpleWorker

from producer import record
from producer.failures import AudioqError, FailureCode
from producer.settings import Settings
from worker import reaper, task
from worker.failures import failure_for
from worker.gemma4.engine import Engine
from worker.job import AudioJob
from worker.lifecycle import JobFailed, record_failure

# RQ's hard time limit is the longest job the settings allow plus this margin (the producer
# enqueues with the same value), so the cooperative, audio-derived deadline fires first.
TICK = 1.0  # seconds between the background thread's rounds (scheduler), at most

log = logging.getLogger("audioq.worker")


class Maintenance(threading.Thread):
    """Beats for the running job, lost-job sweeps and scheduled retries; Redis only."""

    def __init__(self, worker: AudioWorker):
        super().__init__(name="audioq-maintenance", daemon=True)
        self.worker = worker
        self.settings = worker.settings
        self.connection = worker.connection
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.job_id: str | None = None
        self.scheduler = RQScheduler(worker.queues, connection=worker.connection, serializer=JSONSerializer,
                                     name=f"{worker.name}-scheduler")

    def job_started(self, job_id: str) -> None:
        """Beat before RQ registers the job as started, so the reaper never sees it beatless."""
        with self.lock:
            self.job_id = job_id
            reaper.beat(self.connection, job_id, self.worker.name, self.settings.lost_after)

    def job_ended(self, job_id: str) -> None:
        """After RQ removed the job from the started registry: the beat is no longer needed."""
        with self.lock:
            self.job_id = None
            self.connection.delete(record.beat_key(job_id))

    def run(self) -> None:
        interval = self.settings.heartbeat_interval
        next_beat = next_sweep = 0.0
        self.scheduler.register_birth()
        while not self.stopping.wait(min(TICK, interval)):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + interval
                    with self.lock:
                        if self.job_id:
                            reaper.beat(self.connection, self.job_id, self.worker.name, self.settings.lost_after)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + interval
                    reaper.sweep(self.connection, self.worker.queue_names(), self.settings, self.worker.name)
                self.schedule()
            except redis.RedisError as exc:
                log.warning("maintenance: %s: %s", type(exc).__name__, exc)
            except Exception:  # the thread must outlive any one bad round, or running jobs look lost
                log.exception("maintenance round failed")

    def schedule(self) -> None:
        """Move retries that came due back onto their queue (RQScheduler's work, without its fork)."""
        if self.scheduler.should_reacquire_locks:
            self.scheduler.acquire_locks()
        if self.scheduler.acquired_locks:
            self.scheduler.heartbeat()
            self.scheduler.enqueue_scheduled_jobs()

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join()
        self.scheduler.release_locks()
        self.scheduler.register_death()


class AudioWorker(SimpleWorker):
    def __init__(self, queues: list[str], *, settings: Settings, engine: Engine, connection: redis.Redis,
                 name: str | None = None):
        if settings.lost_after < 2 * settings.heartbeat_interval:
            raise ValueError(f"lost_after ({settings.lost_after:g} s) must be at least twice heartbeat_interval "
                             f"({settings.heartbeat_interval:g} s), or running jobs would be reaped")
        super().__init__(queues, name=name, connection=connection, serializer=JSONSerializer,
                         job_class=AudioJob, default_result_ttl=settings.result_ttl)
        self.settings = settings
        self.engine = engine
        self.maintenance = Maintenance(self)

    def bootstrap(self, *args, **kwargs) -> None:
        super().bootstrap(*args, **kwargs)
        task.install(task.Resident(self.engine, self.settings, self.name))
        self.maintenance.start()

    def teardown(self) -> None:
        self.maintenance.stop()
        task.install(None)
        super().teardown()

    def execute_job(self, job: AudioJob, queue) -> None:
        # Never below the longest job the settings allow (a producer's -1, "no limit", included):
        # RQ's SIGALRM must stay a backstop behind the cooperative deadline.
        job.timeout = max(job.timeout or 0, self.settings.hard_timeout)
        self.maintenance.job_started(job.id)
        try:
            super().execute_job(job, queue)
        finally:
            self.maintenance.job_ended(job.id)

    def handle_exception(self, job: AudioJob, *exc_info) -> None:
        """Record failures the job function never saw (a refused job, RQ's hard timeout).

        A ``JobFailed`` is an expected outcome (bad audio, missing object, ...) already on the
        job record: one log line, no traceback. Anything else keeps RQ's full traceback log.
        """
        if isinstance(exc_info[1], JobFailed):
            self.log.warning("Worker %s: job %s failed: %s", self.name, job.id, exc_info[1])
            return
        job.meta.pop("unserialized", None)  # RQ's stand-in for meta it could not decode
        attempt = int(job.meta.get(record.META_ATTEMPT, 1))
        record_failure(job, failure_for(exc_info[1], attempt=attempt, worker=self.name))
        super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job: AudioJob, queue, started_job_registry=None, exc_string: str = "") -> None:
        """RQ keeps ``code: message`` as the failed result's exc_string; the traceback is in the log."""
        failure = job.meta.get(record.META_FAILURE)
        if failure:
            exc_string = f"{failure['code']}: {failure['message']}"
        super().handle_job_failure(job, queue, started_job_registry, exc_string)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        while True:
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except Exception as exc:
                if not hasattr(exc, "job_id"):  # RQ tags errors raised while reading a dequeued job
                    raise
                self.fail_unreadable(exc.job_id, exc.queue, exc)
                continue
            if result is not None or timeout is not None or not self.retries_due_soon():
                return result
            time.sleep(TICK / 2)

    def fail_unreadable(self, job_id: str, queue, exc: Exception) -> None:
        """Fail a dequeued job whose hash RQ cannot parse, instead of letting the worker quit on it."""
        error = AudioqError(FailureCode.INVALID_REQUEST, f"the job record cannot be read: {type(exc).__name__}: {exc}")
        failure = failure_for(error, attempt=1, worker=self.name)
        log.error("job %s: %s", job_id, failure.message)
        with self.connection.pipeline() as pipe:
            pipe.hset(AudioJob.key_for(job_id), mapping={
                "status": JobStatus.FAILED.value, "ended_at": utcformat(now()),
                "meta": self.serializer.dumps({record.META_FAILURE: failure.model_dump(mode="json")})})
            pipe.zadd(queue.failed_job_registry.key, {job_id: current_timestamp() + self.settings.failure_ttl})
            pipe.lrem(queue.intermediate_queue_key, 0, job_id)
            pipe.execute()

    def retries_due_soon(self) -> bool:
        """Whether a job in this worker's queues is scheduled within the longest retry backoff."""
        horizon = current_timestamp() + max(self.settings.storage_retry_backoff, default=0) + 2 * TICK
        return any(self.connection.zcount(q.scheduled_job_registry.key, "-inf", horizon) for q in self.queues)


def run_worker(settings: Settings, *, queues: list[str] | None = None, burst: bool = False,
               max_jobs: int | None = None, name: str | None = None) -> int:
    """Load ``settings.model`` once, then work ``queues`` (highest priority first) until stopped.

    Returns the process exit status: 0 after a burst, ``max_jobs`` or a warm shutdown; 2 when
    no model is configured or it cannot be loaded.
    """
    setup_loghandlers("INFO", name="audioq")
    if not settings.model:
        log.error("no model configured: set model in the worker config or AUDIOQ_MODEL")
        return 2
    started = time.perf_counter()
    try:
        engine = Engine.load(settings.model)
    except AudioqError as exc:
        log.error("cannot load model %s: %s", settings.model, exc.message)
        return 2
    log.info("engine %s loaded in %.1f s", engine.model_id, time.perf_counter() - started)
    connection = redis.Redis.from_url(settings.redis_url)
    # A name that says which Mac ran (or lost) a job; RQ's default is a random hex id.
    worker = AudioWorker(queues or settings.queues, settings=settings, engine=engine, connection=connection,
                         name=name or f"{socket.gethostname()}-{os.getpid()}")
    worker.work(burst=burst, max_jobs=max_jobs)
    return 0
