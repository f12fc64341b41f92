"""Jobs whose worker died: requeue them a bounded number of times, then fail them.

``SimpleWorker`` writes a job's StartedJobRegistry entry once, to expire at job timeout +
60 s, and RQ's cleanup only looks every 10 minutes, so the job of a SIGKILLed worker would
read "started" for a quarter of an hour. audioq adds a per-job beat key: the running
worker's background thread refreshes it every ``heartbeat_interval`` with an expiry of
``lost_after``, so a started job without its beat key has no live worker (or a worker whose
job has run past ``Settings.hard_timeout``: the thread stops beating for it, see
``process.Maintenance``). Every worker sweeps its own queues, idle or busy, each queue under
its own Redis lock (``audioq:reaper-lock:<queue>``) that lets one sweep of that queue happen
per ``heartbeat_interval``. One lock per queue, not one for all: with a single lock, two
workers on disjoint queues could fall into step so that one of them always finds the lock
taken and its queues are never swept. The lock is its holder's to renew (``_TAKE_LOCK``):
a worker whose next sweep came a few milliseconds before its own lock expired used to skip
that sweep, so a lost job waited two beats instead of one. A dead holder's lock lapses
within one ``heartbeat_interval``. A lost job is resolved within about
``lost_after + heartbeat_interval`` of its worker's death, while any worker on its queue runs.

A lost job goes back to the front of its queue up to ``lost_job_retries`` times (counted in
``meta[META_LOST]``), then fails with ``worker_lost``. Each resolution is one MULTI/EXEC
that WATCHes the job hash and the beat key, so a job that finishes or beats meanwhile is
left alone. A worker stopped by a cold shutdown (second SIGTERM/Ctrl-C) resolves its own
job through the same ``resolve`` at once, instead of waiting for its beat to expire.
"""

from __future__ import annotations

import logging

import redis
from rq.executions import Execution
from rq.job import JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.utils import now

from producer import record
from producer.failures import FailureCode
from producer.schema import JobFailure
from producer.settings import Settings
from worker.job import AudioJob

log = logging.getLogger("audioq.reaper")

# KEYS[1] the lock, ARGV[1] the worker's name, ARGV[2] the lock's life in ms: taken when free
# or already this worker's (renewed), refused while another live worker holds it.
_TAKE_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def lock_key(queue_name: str) -> str:
    return f"{record.KEY_PREFIX}reaper-lock:{queue_name}"


def beat(connection: redis.Redis, job_id: str, worker_name: str, lost_after: float) -> None:
    connection.set(record.beat_key(job_id), worker_name, px=int(lost_after * 1000))


def sweep(connection: redis.Redis, queue_names: list[str], settings: Settings, worker_name: str, *,
          locked: bool = True) -> dict[str, str]:
    """Resolve every lost job in ``queue_names``, skipping each queue some worker swept moments ago
    (unless not ``locked``: a burst worker's last sweep before it exits; ``resolve`` is safe to race).

    Returns ``{job_id: "requeued" | "failed"}``.
    """
    outcomes = {}
    take_lock = connection.register_script(_TAKE_LOCK)
    for name in queue_names:
        if not locked or take_lock(keys=[lock_key(name)], args=[worker_name, int(settings.heartbeat_interval * 1000)]):
            outcomes.update(resolve_lost(connection, name, settings))
    return outcomes


def resolve_lost(connection: redis.Redis, queue_name: str, settings: Settings) -> dict[str, str]:
    """Resolve every started job of ``queue_name`` that has no beat, lock or no lock.

    ``resolve`` is safe to race, so the lock is only an economy: the worker's registry
    cleanup calls this directly, before RQ's own, which would fail such a job with its
    "Moved to FailedJobRegistry, due to AbandonedJobError" (and honour RQ's retry fields).
    """
    outcomes = {}
    registry = StartedJobRegistry(queue_name, connection=connection, job_class=AudioJob,
                                  serializer=record.SERIALIZER)
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        if connection.exists(record.beat_key(job_id)):
            continue
        outcome = resolve(connection, job_id, execution_id, settings)
        if outcome:
            outcomes[job_id] = outcome
    return outcomes


def resolve(connection: redis.Redis, job_id: str, execution_id: str, settings: Settings, *,
            cause: str | None = None) -> str | None:
    """Requeue or fail one lost job; None if it turned out to be alive, done or gone.

    ``cause`` says what happened to the worker ("was shut down (cold shutdown)"); by default,
    that its heartbeats stopped.
    """
    with connection.pipeline() as pipe:
        try:
            pipe.watch(AudioJob.key_for(job_id), record.beat_key(job_id))
            if pipe.exists(record.beat_key(job_id)) or not pipe.exists(AudioJob.key_for(job_id)):
                return None
            job = AudioJob.fetch(job_id, connection=connection, serializer=record.SERIALIZER)
            if job.get_status(refresh=False) != JobStatus.STARTED:
                return None
            lost = int(job.meta.get(record.META_LOST, 0)) + 1
            requeue = lost <= settings.lost_job_retries
            failure = JobFailure(code=FailureCode.WORKER_LOST, retryable=True, worker=job.worker_name,
                                 attempt=max(1, int(job.meta.get(record.META_ATTEMPT, 1))),
                                 message=_message(job, lost, requeue, settings, cause))
            job.meta[record.META_LOST] = lost
            job.meta[record.META_RETRY if requeue else record.META_FAILURE] = failure.model_dump(mode="json")
            pipe.multi()
            Execution(execution_id, job_id, connection=connection).delete(job, pipe)
            if requeue:
                job.started_at = None
                queue = Queue(job.origin, connection=connection, job_class=AudioJob, serializer=record.SERIALIZER)
                queue.enqueue_job(job, pipeline=pipe, at_front=True)
            else:
                job.failure_ttl = settings.failure_ttl  # the worker's, not the record's
                _fail(job, failure, pipe)
            pipe.execute()
        except redis.WatchError:
            return None
    outcome = "requeued" if requeue else "failed"
    log.warning("job %s %s: %s", job_id, outcome, failure.message)
    return outcome


def _message(job: AudioJob, lost: int, requeue: bool, settings: Settings, cause: str | None) -> str:
    stage = (job.meta.get(record.META_PROGRESS) or {}).get("stage", "claimed")
    if cause is None:
        cause = f"stopped sending heartbeats (none for {settings.lost_after:g} s)"
        ran = (now() - job.started_at).total_seconds() if job.started_at else 0.0
        if ran > settings.hard_timeout:
            cause += (f" after the job ran {ran:.0f} s, past the hard time limit of {settings.hard_timeout} s "
                      f"(the worker may be stuck in one call)")
    what = f"worker {job.worker_name} {cause} while the job was at stage {stage}"
    if requeue:
        return f"{what}; requeued ({lost} of {settings.lost_job_retries} allowed)"
    return f"{what}; lost {lost} times, more than lost_job_retries ({settings.lost_job_retries}) allows"


def _fail(job: AudioJob, failure: JobFailure, pipe) -> None:
    exc_string = f"{failure.code.value}: {failure.message}"
    job.ended_at = now()
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job.save(pipeline=pipe)
    job.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=exc_string, pipeline=pipe)
    Result.create_failure(job, job.failure_ttl, exc_string=exc_string, worker_name=job.worker_name or "",
                          pipeline=pipe)
