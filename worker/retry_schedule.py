"""Retries that came due go back onto their queue: every worker moves them, no lock to hold.

A ``storage_unavailable`` retry waits in its queue's ``ScheduledJobRegistry`` (RQ's, scored
by the time it is due). RQ's own scheduler moves due jobs under per-queue locks that one
process holds for minutes and others retake only on their slow maintenance cycle, so a
dead holder delayed a retry due in 4.5 s by 114 s. Here every worker's maintenance thread
calls ``enqueue_due`` about once a second; each queue's move is one MULTI/EXEC that WATCHes
the registry, so when several workers find the same due jobs exactly one of them moves
them (the others' transactions fail and they move on). Nothing is held between rounds, so
nothing a dead worker held can delay a retry: a retry is back on its queue within a
round of coming due while any worker on that queue runs.
"""

from __future__ import annotations

import logging

import redis
from rq.exceptions import NoSuchJobError
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry
from rq.utils import current_timestamp

from producer import record
from producer.printable import printable
from worker.job import AudioJob

BATCH = 500  # due jobs moved per queue per round, so one transaction stays short

log = logging.getLogger("audioq.worker")


def enqueue_due(connection: redis.Redis, queue_names: list[str]) -> dict[str, list[str]]:
    """Move every due job of ``queue_names`` to the back of its queue; returns ``{queue: [job ids]}``."""
    moved = {}
    for name in queue_names:
        job_ids = _move(connection, name)
        if job_ids:
            moved[name] = job_ids
    return moved


def _move(connection: redis.Redis, queue_name: str) -> list[str]:
    queue = Queue(queue_name, connection=connection, job_class=AudioJob, serializer=record.SERIALIZER)
    registry = ScheduledJobRegistry(queue=queue)
    with connection.pipeline() as pipe:
        try:
            pipe.watch(registry.key)
            due = pipe.zrangebyscore(registry.key, 0, current_timestamp(), start=0, num=BATCH)
            if not due:
                return []
            jobs = [job for job in (_readable(connection, raw) for raw in due) if job is not None]
            pipe.multi()
            for job in jobs:
                queue.enqueue_job(job, pipeline=pipe)
            pipe.zrem(registry.key, *due)
            pipe.execute()
        except redis.WatchError:  # another worker moved them (or more came due): its round, not ours
            return []
    return [job.id for job in jobs]


def _readable(connection: redis.Redis, raw_id: bytes) -> AudioJob | None:
    """The job a registry member names, or None: its record expired meanwhile, or the member or
    its record is not one audioq wrote (anyone who can write Redis can add one). Either way it
    only leaves the registry, so it cannot stop the due retries behind it."""
    try:
        return AudioJob.fetch(raw_id.decode(), connection=connection, serializer=record.SERIALIZER)
    except NoSuchJobError:
        return None
    except redis.RedisError:
        raise  # Redis is away: the round fails, and the next one moves them
    except Exception as exc:  # a bad id, a record RQ cannot restore, or UnreadableRecord
        log.warning("dropped %r from the retry schedule: %s", printable(raw_id.decode(errors="replace")), exc)
        return None
