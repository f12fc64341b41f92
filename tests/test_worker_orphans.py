"""Jobs taken off their queue by a worker that died before starting them go back to the front.

A worker reading several queues pops a job id (RQ's ``Queue.dequeue_any``) before it
registers the job as started; the tests pop it with that same RQ call and never start it,
which is what a worker SIGKILLed (or cut off from Redis) in between leaves behind.
``scripts/bench_load.py`` found two such jobs in 1,000 before this sweep existed.
"""

from __future__ import annotations

import time

import pytest
from conftest import make_tone
from rq import Queue
from worker_fixtures import enqueue, fetch, run_burst, wait_for, worker_settings, write_wav

from producer import record
from worker import orphans
from worker.process import AudioWorker

SLACK = 1.0


@pytest.fixture
def request_for(tmp_path):
    uri = write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()
    return lambda n: {"audio_uri": uri, "metadata": {"n": str(n)}}


def popped(redis_conn, request: dict, job_id: str):
    """Enqueue, then take the job off its queue as a worker does, and never start it."""
    job = enqueue(redis_conn, request, job_id=job_id)
    queue = Queue(job.origin, connection=redis_conn, serializer=record.SERIALIZER)
    taken, _ = Queue.dequeue_any([queue], None, connection=redis_conn, serializer=record.SERIALIZER)
    assert taken.id == job.id and queue.get_job_ids() == []
    return job


def test_an_orphan_goes_back_only_when_a_pass_lost_after_later_still_finds_it(redis_url, redis_conn, request_for):
    settings = worker_settings(redis_url)
    job = popped(redis_conn, request_for(0), "orphan")
    assert orphans.sweep(redis_conn, settings.queues, settings, "w1") == []  # first seen: remembered only
    assert orphans.sweep(redis_conn, settings.queues, settings, "w2") == []  # within lost_after: no pass
    time.sleep(settings.lost_after)
    assert orphans.sweep(redis_conn, settings.queues, settings, "w2") == [job.id]
    assert Queue("default", connection=redis_conn).get_job_ids() == [job.id]


def test_a_workers_maintenance_puts_an_orphan_back_at_the_front_and_it_runs(redis_url, redis_conn, engine,
                                                                             request_for, report):
    settings = worker_settings(redis_url)
    job = popped(redis_conn, request_for(0), "orphan")
    behind = enqueue(redis_conn, request_for(1), job_id="behind")
    worker = AudioWorker(settings.queues, settings=settings, engine=engine, connection=redis_conn)
    started = time.monotonic()
    worker.maintenance.start()
    try:
        wait_for(lambda: job.id in Queue("default", connection=redis_conn).get_job_ids(),
                 timeout=3 * settings.lost_after + SLACK, what="the orphan to be put back")
    finally:
        worker.maintenance.stop()
    back_after = time.monotonic() - started
    assert Queue("default", connection=redis_conn).get_job_ids() == [job.id, behind.id]
    run_burst(settings, engine)
    assert fetch(redis_conn, job.id).get_status() == "finished"
    report(f"orphan: a popped, never started job back on its queue {back_after:.2f} s after the sweeps began "
           f"(lost_after {settings.lost_after:g} s)")


def test_a_queued_record_naming_a_queue_the_worker_does_not_read_is_left_alone(redis_url, redis_conn,
                                                                               request_for):
    settings = worker_settings(redis_url)
    job = popped(redis_conn, request_for(0), "elsewhere")
    redis_conn.hset(job.key, "origin", "nobody-reads-this")  # crafted: the sweep must write no list it names
    for _ in range(2):
        assert orphans.sweep(redis_conn, settings.queues, settings, "w1") == []
        time.sleep(settings.lost_after)
    assert not redis_conn.exists("rq:queue:nobody-reads-this")
