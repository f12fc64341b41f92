"""The worker process: one per Mac, the model resident, several jobs at once on the main thread.

``AudioWorker`` is a ``SimpleWorker``: no fork per job, because MLX/Metal state does not
survive a fork, and the model would otherwise load per job. RQ's loop dequeues one job and
calls ``execute_job``; from there a ``batch.Batch`` takes more jobs itself and runs them
all through one ``Engine.stream``. The RQ side of that is here: ``claim`` starts a job as
``SimpleWorker`` does, with its own execution; ``finish`` ends it through RQ's own success,
retry and failure handlers; ``release`` puts a job claimed ahead back unrun; ``abandon``
resolves a started one on a cold shutdown (docs/design.md, "Several jobs at once").

What ``SimpleWorker`` lacks runs in one background thread (``Maintenance``) that touches
Redis only, never MLX (MLX streams belong to the main thread):

- the beat key of every held job, refreshed every ``heartbeat_interval`` (see ``reaper``), and
  the worker's own (see ``registration``: a crashed worker's name is free again at once);
- the lost-job sweep, in every worker, idle or busy, and the slower one for jobs taken off
  a queue by a worker that died before starting them (``orphans``);
- retries with backoff (``storage_unavailable``) moved back onto their queue once due
  (``retry_schedule``, lock-free): RQ's ``with_scheduler`` forks a process, unsafe in a
  process holding Metal state, and its locks let a dead holder delay retries for minutes.

A job's beat stops once it has run longer than ``Settings.hard_timeout`` on its own count
(in a batch, its share: ``JobRun.elapsed``): by then the hard time limit (SIGALRM) should
have ended it, so the main thread is stuck in a call that never
returns (a native MLX call cannot be interrupted), and the reaper then treats it as lost.

Warm shutdown (first SIGTERM/SIGINT): the jobs in the engine finish, the ones claimed ahead
go back to their queue, then the worker exits 0. A second signal is RQ's cold shutdown,
which raises ``SystemExit`` in the main thread: unstarted jobs go back, and every started
one goes through the reaper's own ``resolve`` at once (requeued at the front while
``lost_job_retries`` allows, else failed as ``worker_lost``), exactly as if the worker had
been SIGKILLed, and the worker exits 0. Redis going away fails nothing and stops nothing
(``outage``). A burst worker waits for jobs in its queues that come due within the longest
retry backoff, and sweeps for lost jobs before it exits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress

import redis
from rq.executions import Execution
from rq.job import JobStatus, Retry
from rq.logutils import setup_loghandlers
from rq.queue import Queue
from rq.utils import current_timestamp, now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from producer import record
from producer.connection import connect
from producer.failures import AudioqError, FailureCode
from producer.printable import printable
from producer.settings import Settings
from worker import heap, orphans, reaper, registration, retry_schedule, storage, task
from worker.batch import Batch
from worker.failures import SHUTDOWN, failure_for
from worker.engine_process import EngineLost, EngineProcess
from worker.gemma4.engine import Engine
from worker.job import AudioJob
from worker.lifecycle import JobFailed, record_failure
from worker.outage import AWAY, Backoff

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
        self.ran: dict[str, Callable[[], float]] = {}  # held job id → the seconds it has run on its own count
        self.overdue_logged: set[str] = set()

    def job_started(self, job_id: str) -> None:
        """Beat before RQ registers the job as started, so the reaper never sees it beatless."""
        claimed = time.monotonic()
        with self.lock:
            self.ran[job_id] = lambda: time.monotonic() - claimed
            self.overdue_logged.discard(job_id)
            reaper.beat(self.connection, job_id, self.worker.name, self.settings.lost_after)

    def count_time_by(self, job_id: str, ran: Callable[[], float]) -> None:
        """From now on the job's time is ``ran()`` (``JobRun.elapsed``: a batched job's own share of
        the batch), so that waiting behind other jobs never reads as a stuck main thread."""
        with self.lock:
            if job_id in self.ran:
                self.ran[job_id] = ran

    def job_ended(self, job_id: str) -> None:
        """After RQ removed the job from the started registry: its beat is no longer needed.

        The job's outcome is on its record by now, so Redis going away here must not raise: the
        caller would retry the whole finish, and a retried success wrote a second result (seen
        in ``scripts/bench_load.py``). The beat key expires by itself after ``lost_after``, and
        the reaper leaves a job that is not started alone.
        """
        self.forget(job_id)
        with suppress(*AWAY):
            self.connection.delete(record.beat_key(job_id))

    def forget(self, job_id: str) -> None:
        """No more beats for the job (its beat key then expires by itself after lost_after)."""
        with self.lock:
            self.ran.pop(job_id, None)
            self.overdue_logged.discard(job_id)

    def beat(self) -> None:
        """Refresh the beat of every job the worker holds, except those that outlived RQ's hard time limit."""
        with self.lock:
            held = list(self.ran.items())
        for job_id, clock in held:
            ran = clock()
            if ran <= self.settings.hard_timeout:
                reaper.beat(self.connection, job_id, self.worker.name, self.settings.lost_after)
            elif job_id not in self.overdue_logged:
                self.overdue_logged.add(job_id)
                log.error("job %s has run %.0f s on its own count, past the hard time limit of %d s: the main "
                          "thread is stuck; no more heartbeats, so the reaper will treat the job as lost", job_id, ran,
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
    # RQ doubles its wait for Redis up to this (60 s by default); set from redis_retry_max_wait.
    max_connection_wait_time = 2.0

    def __init__(self, queues: list[str], *, settings: Settings, engine: Engine, connection: redis.Redis,
                 name: str | None = None):
        super().__init__(queues, name=name, connection=connection, serializer=record.SERIALIZER,
                         job_class=AudioJob, queue_class=AudioQueue, default_result_ttl=settings.result_ttl)
        self.settings = settings
        self.engine = engine
        self.maintenance = Maintenance(self)
        self.max_connection_wait_time = settings.redis_retry_max_wait
        self.backoff = Backoff(settings.redis_retry_max_wait)
        self.max_jobs: int | None = None
        self.jobs_taken = 0

    def work(self, burst: bool = False, *args, max_jobs: int | None = None, **kwargs) -> bool:
        self.max_jobs = max_jobs  # counted per job here: RQ's loop counts one per batch
        return super().work(burst, *args, max_jobs=max_jobs, **kwargs)

    def register_birth(self) -> None:
        """RQ's, once a gone worker's registration under this name is cleared (``registration``)."""
        registration.reclaim(self)
        super().register_birth()
        registration.beat(self.connection, self.name, self.settings.lost_after)

    def register_death(self) -> None:
        super().register_death()
        with suppress(redis.RedisError):  # else the beat expires by itself after lost_after
            registration.forget(self.connection, self.name)

    def unsubscribe(self) -> None:
        """RQ's, with a bounded wait for redis-py's pubsub thread.

        From redis-py 8.2, ``PubSubWorkerThread.stop`` waits for the thread to end, and a thread
        that read its unsubscribe reply before the stop first waits for a new subscription for
        RQ's ``sleep_time`` (60 s): a worker's exit took up to a minute. The thread is a daemon
        that closes its own connection once it wakes.
        """
        if not self.pubsub_thread:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        self.pubsub.unsubscribe()
        try:
            self.pubsub_thread.stop(timeout=1)
        except TypeError:  # redis-py before 8.2: stop() only asks the thread to end
            self.pubsub_thread.stop()
            self.pubsub_thread.join(timeout=1)
        self.pubsub.close()

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
        try:
            super().teardown()
        except AWAY as exc:  # the worker's hash expires by itself
            log.warning("cannot register this worker's death: Redis is away (%s)", exc)

    # ------------------------------------------------------------------ several jobs at once
    def execute_job(self, job: AudioJob, queue) -> None:
        """Run ``job`` and every job taken while it runs as one batch (see ``worker.batch``)."""
        Batch(self).run(job, queue, self.backoff.retry(lambda: self.claim(job, queue), f"claiming job {job.id}"))
        if self.max_jobs is not None and self.jobs_taken >= self.max_jobs:
            self.log.info("Worker %s: took %d jobs, quitting", self.name, self.jobs_taken)
            self._stop_requested = True
        self.backoff.retry(lambda: self.set_state(WorkerStatus.IDLE), "marking the worker idle")

    @property
    def stopping(self) -> bool:
        """A warm shutdown was asked for: the batch finishes what it started and takes nothing more."""
        return self._stop_requested

    def may_take(self) -> bool:
        return not self._stop_requested and (self.max_jobs is None or self.jobs_taken < self.max_jobs)

    def queue_rank(self, queue) -> int:
        return self.queue_names().index(queue.name)

    def take(self, give_up: Callable[[], bool] = lambda: False) -> tuple[AudioJob, Queue, Execution] | None:
        """The next waiting job (highest-priority queue first), claimed, or None; never blocks.

        A claim that fails puts the job back (waiting for Redis while it is away, unless
        ``give_up()``: a cold shutdown) and raises; a job that cannot go back gets no more beats,
        so the reaper or the orphan sweep resolves it."""
        while True:
            try:
                result = self.queue_class.dequeue_any(self.queues, None, connection=self.connection,
                                                      job_class=self.job_class, serializer=self.serializer,
                                                      death_penalty_class=self.death_penalty_class)
            except Exception as exc:
                if not hasattr(exc, "job_id") or isinstance(exc, AWAY):
                    raise
                self.fail_unreadable(exc.job_id, exc.queue, exc)
                continue
            if result is None:
                return None
            job, queue = result
            self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            try:
                return job, queue, self.claim(job, queue)
            except Exception as exc:
                try:
                    self.backoff.retry(lambda: self.release(job, queue, self.execution, dict(job.meta)),
                                       f"putting job {job.id} back", give_up=give_up)
                except Exception as again:
                    self.log.error("job %s: its claim failed (%s) and it cannot go back (%s); the reaper or the "
                                   "orphan sweep resolves it", job.id, exc, again)
                    self.maintenance.forget(job.id)
                raise exc

    def claim(self, job: AudioJob, queue) -> Execution:
        """Start ``job`` as RQ's ``SimpleWorker`` does, with its own execution (started registry entry) and beat."""
        # Never below the longest job the settings allow (a producer's -1, "no limit", included):
        # the hard time limit must stay a backstop behind the cooperative deadline.
        job.timeout = max(job.timeout or 0, self.settings.hard_timeout)
        # How long the outcome is kept is this worker's setting, whatever the record says (a
        # crafted result_ttl of 0 would drop the result, -1 keep it for ever).
        job.result_ttl, job.failure_ttl = self.settings.result_ttl, self.settings.failure_ttl
        self.execution = None  # not the previous job's, should Redis fail before this one's exists
        self.maintenance.job_started(job.id)
        execution = self.prepare_execution(job)
        try:
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        except AWAY:
            raise
        except Exception:
            # Only its last line can fail for the job's own sake: the process title reads the
            # job's function name, which a garbled record lacks. The job is started by then;
            # the batch refuses it by its own check and records why.
            pass
        self.connection.persist(job.key)  # as Job.perform does: a started job never expires
        self.jobs_taken += 1
        return execution

    def finish(self, job: AudioJob, queue, execution: Execution, outcome, work: task.JobWork | None) -> None:
        """Put one job's outcome on its record through RQ's own handlers, as ``perform_job`` does for one job.

        ``outcome`` is the result dict, a ``Retry``, or the exception that ended the job
        (which ``JobWork.failed`` turns into a ``Retry`` or a recorded ``JobFailed``). Redis
        being away raises before anything is written (the ping), so the caller can retry;
        RQ's failure handler would swallow it.
        """
        self.connection.ping()
        if isinstance(outcome, BaseException) and work is not None and not isinstance(outcome, JobFailed):
            try:
                outcome = work.failed(outcome)
            except JobFailed as failed:
                outcome = failed
        self.execution = execution  # RQ's handlers read the running job's execution from the worker
        self.set_current_job_id(job.id)
        registry = queue.started_job_registry
        if isinstance(outcome, BaseException):
            job._status = JobStatus.FAILED
            self.handle_execution_ended(job, queue, job.failure_callback_timeout)
            exc_info = (type(outcome), outcome, outcome.__traceback__)
            self.handle_exception(job, *exc_info)
            self.handle_job_failure(job, queue, registry, "".join(traceback.format_exception(*exc_info)))
        else:
            self.handle_execution_ended(job, queue, job.success_callback_timeout)
            job._result = outcome
            if isinstance(outcome, Retry):
                self.handle_job_retry(job, queue, outcome, registry, execution)
            else:
                job._status = JobStatus.FINISHED
                self.handle_job_success(job, queue, registry)
                self.log.info("Worker %s: %s: Job OK (%s)", self.name, job.origin, job.id)
        self.maintenance.job_ended(job.id)

    def release(self, job: AudioJob, queue, execution: Execution | None, prior_meta: dict) -> None:
        """Put a claimed job that never ran back at the front of its queue, its meta as before the claim."""
        job.meta = dict(prior_meta)
        job.started_at = None
        with self.connection.pipeline() as pipe:
            pipe.multi()
            if execution is not None:
                execution.delete(job, pipe)
            queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        self.maintenance.job_ended(job.id)
        self.log.info("Worker %s: job %s put back on %s unrun", self.name, job.id, queue.name)

    def abandon(self, job: AudioJob, execution: Execution) -> None:
        """Cold shutdown: resolve a started job like a SIGKILLed worker's, now rather than after lost_after.

        The thread stops first (the worker is exiting anyway): its sweep would otherwise find the
        job beatless between these two steps and resolve it as a worker that stopped beating."""
        self.maintenance.stop()
        self.maintenance.job_ended(job.id)
        reaper.resolve(self.connection, job.id, execution.id, self.settings, cause="was shut down (cold shutdown)")

    def stop_beating(self, job_id: str) -> None:
        self.maintenance.forget(job_id)

    # ------------------------------------------------------------------ Redis being away
    def heartbeat(self, *args, **kwargs) -> None:
        """RQ's worker beat; while Redis is away there is nothing to beat (the worker's hash outlives a blip)."""
        try:
            super().heartbeat(*args, **kwargs)
        except AWAY as exc:
            self.log.debug("worker heartbeat skipped: Redis is away (%s)", exc)

    def check_for_suspension(self, burst: bool) -> None:
        self.backoff.retry(lambda: super(AudioWorker, self).check_for_suspension(burst), "checking for suspension")

    def run_maintenance_tasks(self) -> None:
        self.backoff.retry(super().run_maintenance_tasks, "cleaning RQ's registries")

    def handle_exception(self, job: AudioJob, *exc_info) -> None:
        """Record failures the job function never saw (a refused job, RQ's hard timeout).

        A ``JobFailed`` is an expected outcome (bad audio, missing object, ...) already on the
        job record, and an ``AudioqError`` here is a job ``AudioJob.func`` refused before
        anything ran (recorded now): one log line each, no traceback. A cold shutdown's
        ``SystemExit`` goes back up to the batch, past RQ's failure handling. Anything
        else keeps RQ's full traceback log.
        """
        exc = exc_info[1]
        if isinstance(exc, SHUTDOWN):
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
        """RQ's wait for the next job, riding out Redis being away and not quitting a burst too early.

        A burst worker finding its queues empty waits for retries coming due soon, then
        sweeps its queues for lost jobs (without the reaper's once-per-interval lock) and
        goes on if that requeued one, so it never exits while a dead worker's job is "started".
        """
        while True:
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                if result is not None or timeout is not None:
                    self.backoff.succeeded()
                    return result
                if self.swept_lost_jobs():
                    continue
                if not self.work_coming():
                    return None
            except AWAY as exc:  # AudioQueue put a half-read job back
                time.sleep(self.backoff.failed(exc, "waiting for jobs"))
                continue
            except Exception as exc:
                # RQ tags every error raised while reading a dequeued job: the job's record is at fault.
                if not hasattr(exc, "job_id"):
                    raise
                self.fail_unreadable(exc.job_id, exc.queue, exc)
                continue
            time.sleep(TICK / 2)

    def swept_lost_jobs(self) -> bool:
        """Resolve lost jobs in this worker's queues now; whether one was requeued (there is work again)."""
        outcomes = reaper.sweep(self.connection, self.queue_names(), self.settings, self.name, locked=False)
        return "requeued" in outcomes.values()

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

    def work_coming(self) -> bool:
        """Whether a job in this worker's queues is scheduled within the longest retry backoff, or back on
        a queue already: the maintenance thread may have moved a due retry there since the dequeue
        found the queues empty (a burst worker quit with it queued). The registry is read first: a
        move between the two reads then shows in the second."""
        horizon = current_timestamp() + max(self.settings.storage_retry_backoff, default=0) + 2 * TICK
        if any(self.connection.zcount(q.scheduled_job_registry.key, "-inf", horizon) for q in self.queues):
            return True
        return any(q.count for q in self.queues)


def engine_options(settings: Settings) -> dict:
    """The engine's batch limits from the settings, for the worker and ``audioq transcribe`` alike:
    a job's (or a file's) clips are rows, and the memory budget is the KV cache's bound."""
    return dict(max_rows=settings.batch_max_jobs, max_batch_tokens=settings.batch_token_budget,
                prefill_tokens=settings.batch_prefill_tokens, encode_rows=settings.batch_encode_clips,
                padding_slack=settings.batch_padding_slack, join_rows=settings.batch_join_jobs,
                join_wait=settings.batch_join_wait)


def run_worker(settings: Settings, *, queues: list[str] | None = None, burst: bool = False,
               max_jobs: int | None = None, name: str | None = None) -> int:
    """Load ``settings.model`` once, then work ``queues`` (highest priority first) until stopped.

    Returns the process exit status: 0 after a burst, ``max_jobs`` or a warm shutdown; 3 (the
    CLI's "could not run") when no model is configured or it cannot be loaded, or when a live
    worker holds ``name``; 4 when the engine process died (its jobs are resolved: a supervisor
    should start the worker again).
    """
    setup_loghandlers("INFO", name="audioq")
    if not settings.model:
        log.error("no model configured: set model in the worker config or AUDIOQ_MODEL")
        return 3
    started = time.perf_counter()
    try:
        options = engine_options(settings)
        engine = (EngineProcess(settings.model, options) if settings.engine_process
                  else Engine.load(settings.model, **options))
    except AudioqError as exc:
        log.error("cannot load model %s: %s", settings.model, exc.message)
        return 3
    try:
        log.info("engine %s loaded in %.1f s%s", engine.model_id, time.perf_counter() - started,
                 f" (process {engine.process.pid})" if settings.engine_process else "")
        log.info("warm-up (dummy clips through every stage and batch shape) took %.2f s", engine.warm_up())
        log.info("storage warm-up: %s", storage.warm_up(settings))
        log.info("%d objects of the warmed-up worker set aside from garbage collection", heap.set_aside())
        connection = connect(settings)
        # A name that says which Mac ran (or lost) a job; RQ's default is a random hex id.
        worker = AudioWorker(queues or settings.queues, settings=settings, engine=engine, connection=connection,
                             name=name or f"{socket.gethostname()}-{os.getpid()}")
        worker.work(burst=burst, max_jobs=max_jobs)
    except registration.NameTaken as exc:
        log.error("%s", exc)
        return 3
    except EngineLost:  # during the warm-up; during work RQ's loop logs it and stops, the batch resolved its jobs
        pass
    finally:
        if settings.engine_process:
            engine.close()
    if settings.engine_process and engine.lost is not None:
        log.error("%s: the worker exits so that its supervisor starts it again", engine.lost)
        return 4
    return 0
