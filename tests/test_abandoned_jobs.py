"""A job RQ's registry cleanup finds abandoned gets audioq's outcome and words, never RQ's.

RQ's cleanup (every worker's start, then every 10 minutes) fails a started job whose
registry entry has expired (job timeout + 60 s after it started) with "Moved to
FailedJobRegistry, due to AbandonedJobError". That happens when no audioq worker swept the
queue meanwhile: every worker was down longer than that. The entry's score is set in the
past here to stand for those minutes; the job is stranded as a SIGKILLed worker leaves it.
(How the producer reads a record RQ's own cleanup failed: ``test_producer_lifecycle``.)
"""

from __future__ import annotations

from conftest import make_tone
from rq.registry import StartedJobRegistry
from rq.utils import current_timestamp
from worker_fixtures import enqueue, fetch, strand, worker_settings, write_wav

from producer import record
from worker.process import AudioWorker


def abandoned(redis_conn, settings, tmp_path):
    """A started job with no beat whose StartedJobRegistry entry expired a minute ago."""
    request = {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()}
    job = strand(redis_conn, enqueue(redis_conn, request, settings=settings), settings)
    registry = StartedJobRegistry(job.origin, connection=redis_conn)
    for entry in redis_conn.zrange(registry.key, 0, -1):
        redis_conn.zadd(registry.key, {entry: current_timestamp() - 60})
    return job


def test_a_workers_registry_cleanup_resolves_an_abandoned_job_as_worker_lost(redis_url, redis_conn, engine,
                                                                              tmp_path):
    settings = worker_settings(redis_url, lost_job_retries=0)
    job = abandoned(redis_conn, settings, tmp_path)
    worker = AudioWorker(settings.queues, settings=settings, engine=engine, connection=redis_conn)
    worker.clean_registries()  # what RQ's work loop runs first thing, before audioq's thread sweeps
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "worker_lost"
    assert "stopped sending heartbeats" in failure["message"]
    assert job.latest_result().exc_string == f"worker_lost: {failure['message']}"

