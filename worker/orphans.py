"""Jobs that read "queued" but sit in no queue and no registry: back to the front of their queue.

RQ takes a job id off the queue (BLPOP, when a worker reads several queues) before it
registers the job as started. A worker SIGKILLed in between, or one whose Redis went away
in between and could not put the id back (``process.AudioQueue``), leaves the job "queued"
where no worker will ever look: ``scripts/bench_load.py`` lost 2 of 1,000 jobs that way
(four SIGKILLs and a Redis restart). The reaper cannot see them, since they never reached
the started registry.

Once per ``lost_after`` one of the workers reading the same queues (lock
``audioq:orphan-lock:<queues>``, lapsing after ``lost_after``; per set of queues, so workers
on disjoint queues never keep each other from a pass) scans the job hashes. A queued job of
those queues in neither its queue nor its started registry is a candidate, remembered in
``audioq:orphans:<queues>`` with its ``enqueued_at``; one
still in that state, with the same ``enqueued_at``, at a later pass goes back to the front
of its queue (and out of RQ's intermediate list, whose cleanup would otherwise fail it).
Jobs naming a queue the worker does not read are left alone: ``origin`` is whatever the
record says. Passes are at least ``lost_after`` apart, thousands of times the
milliseconds a live worker spends between the pop and the registration, so a job a live
worker is taking is never moved. An orphan is back within about two to three ``lost_after``.
The scan reads every ``rq:job:*`` key once per pass (SCAN, pipelined reads): a few
milliseconds of Redis time per thousand jobs kept.
"""

from __future__ import annotations

import logging

import redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry

from producer import record
from producer.settings import Settings

SCAN_COUNT = 1000  # keys per SCAN call, and job hashes read per pipeline

log = logging.getLogger("audioq.reaper")


def lock_key(queue_names: list[str]) -> str:
    return f"{record.KEY_PREFIX}orphan-lock:{','.join(sorted(queue_names))}"


def candidates_key(queue_names: list[str]) -> str:
    return f"{record.KEY_PREFIX}orphans:{','.join(sorted(queue_names))}"


def sweep(connection: redis.Redis, queue_names: list[str], settings: Settings, worker_name: str) -> list[str]:
    """One pass over ``queue_names``, unless a worker on the same queues made one within ``lost_after``.

    Returns the ids put back.
    """
    if not connection.set(lock_key(queue_names), worker_name, nx=True, px=int(settings.lost_after * 1000)):
        return []
    candidates = candidates_key(queue_names)
    previous = {k.decode(): v for k, v in connection.hgetall(candidates).items()}
    found = _orphaned(connection, set(queue_names))
    requeued = [job_id for job_id, (origin, enqueued_at) in found.items()
                if previous.get(job_id) == enqueued_at and _requeue(connection, job_id, origin)]
    remembered = {job_id: enqueued_at for job_id, (_, enqueued_at) in found.items() if job_id not in requeued}
    with connection.pipeline() as pipe:
        pipe.delete(candidates)
        if remembered:
            pipe.hset(candidates, mapping=remembered)
            pipe.pexpire(candidates, int(3 * settings.lost_after * 1000))
        pipe.execute()
    return requeued


def _orphaned(connection: redis.Redis, queue_names: set[str]) -> dict[str, tuple[str, bytes]]:
    """``{job_id: (queue, enqueued_at)}`` of queued jobs of ``queue_names`` in neither their queue nor
    its started registry."""
    queued: dict[str, tuple[str, bytes]] = {}
    prefix = Job.redis_job_namespace_prefix
    keys = [k for k in connection.scan_iter(match=f"{prefix}*", count=SCAN_COUNT) if k.count(b":") == 2]
    for start in range(0, len(keys), SCAN_COUNT):
        chunk = keys[start:start + SCAN_COUNT]
        with connection.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hmget(key, "status", "origin", "enqueued_at")
            for key, (status, origin, enqueued_at) in zip(chunk, pipe.execute()):
                if status == JobStatus.QUEUED.value.encode() and origin and origin.decode() in queue_names:
                    queued[key.decode()[len(prefix):]] = (origin.decode(), enqueued_at or b"")
    if not queued:
        return {}
    waiting, running = {}, {}
    for origin in {origin for origin, _ in queued.values()}:
        queue = Queue(origin, connection=connection)
        waiting[origin] = set(queue.get_job_ids())
        running[origin] = {job_id for job_id, _ in StartedJobRegistry(queue=queue).get_job_and_execution_ids(
            cleanup=False)}
    return {job_id: (origin, enqueued_at) for job_id, (origin, enqueued_at) in queued.items()
            if job_id not in waiting[origin] and job_id not in running[origin]}


def _requeue(connection: redis.Redis, job_id: str, origin: str) -> bool:
    """LPUSH the id back, unless the job changed or reappeared meanwhile (one WATCHed transaction)."""
    queue = Queue(origin, connection=connection)
    job_key = Job.key_for(job_id)
    with connection.pipeline() as pipe:
        try:
            pipe.watch(job_key, queue.key)
            if pipe.hget(job_key, "status") != JobStatus.QUEUED.value.encode() or \
                    pipe.lpos(queue.key, job_id) is not None:
                return False
            pipe.multi()
            pipe.lrem(queue.intermediate_queue_key, 0, job_id)
            pipe.lpush(queue.key, job_id)
            pipe.execute()
        except redis.WatchError:
            return False
    log.warning("job %s was taken off queue %s by a worker that never started it (killed, or Redis went away "
                "in between); put back at the front", job_id, origin)
    return True
