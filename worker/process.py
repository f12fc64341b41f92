"""The worker process: one per Mac, the model resident, jobs run on the main thread.

``AudioWorker`` is a ``SimpleWorker``: no fork per job, because MLX/Metal state does not
survive a fork, and the model would otherwise load per job. It adds what ``SimpleWorker``
lacks, in one background thread (``Maintenance``) that touches Redis only, never MLX
(MLX streams belong to the main thread):

- the running job's beat key, refreshed every ``heartbeat_interval`` (see ``reaper``), and
  the worker's own (see ``registration``: a crashed worker's name is free again at once);
- the lost-job sweep, in every worker, idle or busy, and the slower one for jobs taken off
  a queue by a worker that died before starting them (``orphans``);
- retries with backoff (``storage_unavailable``) moved back onto their queue once due
  (``retry_schedule``, lock-free): RQ's ``with_scheduler`` forks a process, unsafe in a
  process holding Metal state, and its locks let a dead holder delay retries for minutes.

The beat stops once a job has run longer than ``Settings.hard_timeout``: by then RQ's own
SIGALRM should have ended it, so the main thread is stuck in a call that never returns
(a native MLX call cannot be interrupted), and the reaper then treats the job as lost.

Warm shutdown is RQ's: the first SIGTERM/SIGINT lets the current job finish, then the
worker exits 0. A second signal is RQ's cold shutdown, which raises ``SystemExit`` inside
the job: the job then goes through the reaper's own ``resolve`` at once (requeued at the
front while ``lost_job_retries`` allows, else failed as ``worker_lost``), exactly as if the
worker had been SIGKILLed, and the worker exits 0. A burst worker also waits for jobs in
its queues that come due within the longest retry backoff, so a burst drains its retries
instead of leaving them scheduled.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import suppress

import redis
from rq.job import JobStatus
from rq.logutils import setup_loghandlers
from rq.queue import Queue
from rq.utils import current_timestamp, now, utcformat
from rq.worker import SimpleWorker

from producer import record
from producer.connection import connect
from producer.failures import AudioqError, FailureCode
from producer.printable import printable
from producer.settings import Settings
from worker import orphans, reaper, registration, retry_schedule, task
from worker.failures import failure_for
from worker.gemma4.engine import Engine
from worker.job import AudioJob
from worker.lifecycle import JobFailed, record_failure

TICK = 1.0  # seconds between the background thread's rounds (due retries), at most

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
        self.job_started_at = 0.0  # time.monotonic() when the running job started
        self.overdue_logged = False

    def job_started(self, job_id: str) -> None:
        """Beat before RQ registers the job as started, so the reaper never sees it beatless."""
        with self.lock:
            self.job_id = job_id
            self.job_started_at = time.monotonic()
            self.overdue_logged = False
            reaper.beat(self.connection, job_id, self.worker.name, self.settings.lost_after)

    def job_ended(self, job_id: str) -> None:
        """After RQ removed the job from the started registry: the beat is no longer needed."""
        with self.lock:
            self.job_id = None
            self.connection.delete(record.beat_key(job_id))

    def beat(self) -> None:
        """Refresh the running job's beat, unless it has outlived RQ's hard time limit."""
        with self.lock:
            if not self.job_id:
                return
            ran = time.monotonic() - self.job_started_at
            if ran <= self.settings.hard_timeout:
                reaper.beat(self.connection, self.job_id, self.worker.name, self.settings.lost_after)
            elif not self.overdue_logged:
                self.overdue_logged = True
                log.error("job %s has run %.0f s, past the hard time limit of %d s: the main thread is stuck; "
                          "no more heartbeats, so the reaper will treat the job as lost", self.job_id, ran,
                          self.settings.hard_timeout)

    def run(self) -> None:
        interval = self.settings.heartbeat_interval
        next_beat = next_sweep = 0.0
        while not self.stopping.wait(min(TICK, interval)):
            # Everything inside the try: the thread must outlive any one bad round (Redis away,
            # ...), or every job this worker runs would look lost.
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + interval
                    registration.beat(self.connection, self.worker.name, self.settings.lost_after)
                    self.beat()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + interval
                    reaper.sweep(self.connection, self.worker.queue_names(), self.settings, self.worker.name)
                    orphans.sweep(self.connection, self.worker.queue_names(), self.settings, self.worker.name)
                for queue, job_ids in retry_schedule.enqueue_due(self.connection, self.worker.queue_names()).items():
                    log.info("retries due, back on %s: %s", queue, ", ".join(job_ids))
            except redis.RedisError as exc:
                log.warning("maintenance: %s: %s", type(exc).__name__, exc)
            except Exception:
                log.exception("maintenance round failed")

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join()


class AudioQueue(Queue):
    """RQ's queue, except that a job whose record Redis failed to return goes back on its queue.

    ``dequeue_any`` pops a job id, then reads the job's hash; when that read fails for want
    of Redis (connection lost, timeout), RQ raises with the id already taken off the queue
    (by LPOP when the worker reads several queues), so the job would stay "queued" in no
    queue at all. Here it goes back to the front first; the error then goes on to RQ's
    worker, which waits and retries (connection errors) or quits (timeouts).
    """

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, **options):
        try:
            return super().dequeue_any(queues, timeout, connection=connection, **options)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if hasattr(exc, "job_id"):
                _put_back(connection, exc.job_id, exc.queue, exc)
            raise


def _put_back(connection: redis.Redis, job_id: str, queue: Queue, exc: Exception) -> None:
    log.warning("job %s: Redis failed while reading it (%s: %s); putting it back on %s", job_id,
                type(exc).__name__, exc, queue.name)
    try:
        with connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 0, job_id)
            pipe.lrem(queue.key, 0, job_id)
            pipe.lpush(queue.key, job_id)
            pipe.execute()
    except redis.RedisError as again:
        log.error("job %s: cannot put it back on %s either (%s: %s); it stays queued in no queue until "
                  "requeued by id", job_id, queue.name, type(again).__name__, again)


class AudioWorker(SimpleWorker):
    def __init__(self, queues: list[str], *, settings: Settings, engine: Engine, connection: redis.Redis,
                 name: str | None = None):
        super().__init__(queues, name=name, connection=connection, serializer=record.SERIALIZER,
                         job_class=AudioJob, queue_class=AudioQueue, default_result_ttl=settings.result_ttl)
        self.settings = settings
        self.engine = engine
        self.maintenance = Maintenance(self)

    def register_birth(self) -> None:
        """RQ's, once a gone worker's registration under this name is cleared (``registration``)."""
        registration.reclaim(self)
        super().register_birth()
        registration.beat(self.connection, self.name, self.settings.lost_after)

    def register_death(self) -> None:
        super().register_death()
        with suppress(redis.RedisError):  # else the beat expires by itself after lost_after
            registration.forget(self.connection, self.name)

    def clean_registries(self) -> None:
        """audioq's reaper first, so RQ's cleanup never fails an abandoned job with its own message."""
        for name in self.queue_names():
            reaper.resolve_lost(self.connection, name, self.settings)
        super().clean_registries()

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
        except (SystemExit, KeyboardInterrupt):
            self.resolve_after_cold_shutdown(job)
            raise
        finally:
            with suppress(redis.RedisError):  # else the beat expires by itself after lost_after
                self.maintenance.job_ended(job.id)

    def resolve_after_cold_shutdown(self, job: AudioJob) -> None:
        """Treat the job like a SIGKILLed worker's: the reaper's ``resolve``, now rather than after lost_after."""
        execution = self.execution  # still set: RQ's cleanup never ran
        # The thread goes first (the worker is exiting anyway): its sweep would otherwise find the
        # job beatless between these two steps and resolve it as a worker that stopped beating.
        self.maintenance.stop()
        try:
            self.maintenance.job_ended(job.id)
            if execution is not None:
                reaper.resolve(self.connection, job.id, execution.id, self.settings,
                               cause="was shut down (cold shutdown)")
        except redis.RedisError as exc:
            log.error("job %s: cannot resolve it after the cold shutdown (%s: %s); the reaper will once its "
                      "heartbeat expires", job.id, type(exc).__name__, exc)

    def handle_exception(self, job: AudioJob, *exc_info) -> None:
        """Record failures the job function never saw (a refused job, RQ's hard timeout).

        A ``JobFailed`` is an expected outcome (bad audio, missing object, ...) already on the
        job record, and an ``AudioqError`` here is a job ``AudioJob.func`` refused before
        anything ran (recorded now): one log line each, no traceback. A cold shutdown's
        ``SystemExit`` goes back up to ``execute_job``, past RQ's failure handling. Anything
        else keeps RQ's full traceback log.
        """
        exc = exc_info[1]
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise exc
        if isinstance(exc, JobFailed):
            self.log.warning("Worker %s: job %s failed: %s", self.name, job.id, exc)
            return
        job.meta.pop("unserialized", None)  # RQ's stand-in for meta it could not decode
        attempt = int(job.meta.get(record.META_ATTEMPT, 1))
        record_failure(job, failure_for(exc, attempt=attempt, worker=self.name))
        if isinstance(exc, AudioqError):
            self.log.warning("Worker %s: job %s refused: %s", self.name, job.id, exc)
            return
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
                # RQ tags every error raised while reading a dequeued job. Redis failing is not
                # the job's fault (AudioQueue put the job back); anything else is its record's.
                if not hasattr(exc, "job_id") or isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                    raise
                self.fail_unreadable(exc.job_id, exc.queue, exc)
                continue
            if result is not None or timeout is not None or not self.retries_due_soon():
                return result
            time.sleep(TICK / 2)

    def fail_unreadable(self, job_id: str, queue, exc: Exception) -> None:
        """Fail a dequeued job whose hash RQ cannot parse, instead of letting the worker quit on it.

        Only ``status``, ``ended_at`` and the failure in ``meta`` are written (the rest of the
        meta, the request included, is kept when it decodes). ``FailedJobRegistry.add`` needs
        a parsed ``Job`` (it re-saves the whole hash from it), so its two effects are written
        here: the registry entry and the hash's expiry, both ``failure_ttl``.
        """
        error = AudioqError(FailureCode.INVALID_REQUEST, f"the job record cannot be read: {type(exc).__name__}: {exc}")
        failure = failure_for(error, attempt=1, worker=self.name)
        log.error("job %s: %s", printable(job_id), failure.message)
        key, ttl = AudioJob.key_for(job_id), self.settings.failure_ttl
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    meta = self.decoded_meta(pipe.hget(key, "meta"))
                    meta[record.META_FAILURE] = failure.model_dump(mode="json")
                    pipe.multi()
                    pipe.hset(key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(now()),
                                            "meta": self.serializer.dumps(meta)})
                    pipe.expire(key, ttl)
                    pipe.zadd(queue.failed_job_registry.key, {job_id: current_timestamp() + ttl})
                    pipe.lrem(queue.intermediate_queue_key, 0, job_id)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
                except redis.ResponseError as wrong:  # WRONGTYPE: the key is not a job hash at all
                    log.error("job %s: its key cannot hold a failure (%s); dropped", job_id, wrong)
                    self.connection.lrem(queue.intermediate_queue_key, 0, job_id)
                    return

    def decoded_meta(self, raw: bytes | None) -> dict:
        try:
            meta = self.serializer.loads(raw) if raw else {}
        except ValueError:  # not JSON (json's errors, UnicodeDecodeError included, are ValueErrors)
            return {}
        return meta if isinstance(meta, dict) else {}

    def retries_due_soon(self) -> bool:
        """Whether a job in this worker's queues is scheduled within the longest retry backoff."""
        horizon = current_timestamp() + max(self.settings.storage_retry_backoff, default=0) + 2 * TICK
        return any(self.connection.zcount(q.scheduled_job_registry.key, "-inf", horizon) for q in self.queues)


def run_worker(settings: Settings, *, queues: list[str] | None = None, burst: bool = False,
               max_jobs: int | None = None, name: str | None = None) -> int:
    """Load ``settings.model`` once, then work ``queues`` (highest priority first) until stopped.

    Returns the process exit status: 0 after a burst, ``max_jobs`` or a warm shutdown; 3 (the
    CLI's "could not run") when no model is configured or it cannot be loaded, or when a live
    worker holds ``name``.
    """
    setup_loghandlers("INFO", name="audioq")
    if not settings.model:
        log.error("no model configured: set model in the worker config or AUDIOQ_MODEL")
        return 3
    started = time.perf_counter()
    try:
        engine = Engine.load(settings.model)
    except AudioqError as exc:
        log.error("cannot load model %s: %s", settings.model, exc.message)
        return 3
    log.info("engine %s loaded in %.1f s", engine.model_id, time.perf_counter() - started)
    connection = connect(settings)
    # A name that says which Mac ran (or lost) a job; RQ's default is a random hex id.
    worker = AudioWorker(queues or settings.queues, settings=settings, engine=engine, connection=connection,
                         name=name or f"{socket.gethostname()}-{os.getpid()}")
    try:
        worker.work(burst=burst, max_jobs=max_jobs)
    except registration.NameTaken as exc:
        log.error("%s", exc)
        return 3
    return 0
