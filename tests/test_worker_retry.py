"""storage_unavailable is retried with backoff through RQ, then failed; nothing else is retried.

Storage is "down" for real: the worker's S3 endpoint is a loopback port nobody listens on.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.results import Result
from worker_fixtures import closed_endpoint, enqueue, fetch, run_burst, worker_settings

from producer import record
from worker import retry_schedule


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch):
    """Some credentials, so requests are signed and then refused at the closed port."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def result_types(job) -> list[str]:
    return [r.type.name for r in reversed(job.results())]


def test_storage_unavailable_is_retried_then_failed(redis_url, redis_conn, engine):
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    run_burst(worker_settings(redis_url, s3_endpoint_url=closed_endpoint(), storage_retries=2,
                              storage_retry_backoff=[0.0]), engine)
    job = fetch(redis_conn, job.id)
    meta = job.get_meta()
    assert job.get_status() == "failed"
    assert meta[record.META_FAILURE]["code"] == "storage_unavailable" and meta[record.META_FAILURE]["retryable"]
    assert meta[record.META_ATTEMPT] == 3 and meta[record.META_FAILURE]["attempt"] == 3
    assert meta[record.META_RETRY]["code"] == "storage_unavailable" and meta[record.META_RETRY]["attempt"] == 2
    assert result_types(job) == ["RETRIED", "RETRIED", "FAILED"]
    assert job.latest_result().type == Result.Type.FAILED
    assert job.latest_result().exc_string.startswith("storage_unavailable: cannot reach storage")


def test_retries_wait_their_backoff_and_a_burst_worker_drains_them(redis_url, redis_conn, engine):
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    started = time.monotonic()
    run_burst(worker_settings(redis_url, s3_endpoint_url=closed_endpoint(), storage_retries=2,
                              storage_retry_backoff=[1.0, 2.0]), engine)
    elapsed = time.monotonic() - started
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and job.get_meta()[record.META_ATTEMPT] == 3
    assert result_types(job) == ["RETRIED", "RETRIED", "FAILED"]
    assert 2.0 <= elapsed < 10.0  # RQ's scheduled registry has one-second resolution


def test_no_retries_configured_fails_at_once(redis_url, redis_conn, engine):
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    run_burst(worker_settings(redis_url, s3_endpoint_url=closed_endpoint(), storage_retries=0), engine)
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and result_types(job) == ["FAILED"]
    assert record.META_RETRY not in job.get_meta()


def test_other_failures_are_not_retried(redis_url, redis_conn, engine, tmp_path):
    job = enqueue(redis_conn, {"audio_uri": (tmp_path / "missing.wav").as_uri()})
    run_burst(worker_settings(redis_url, storage_retries=3), engine)
    job = fetch(redis_conn, job.id)
    assert result_types(job) == ["FAILED"] and job.get_meta()[record.META_ATTEMPT] == 1


def test_entries_of_the_retry_schedule_audioq_did_not_write_are_dropped_and_the_due_retries_move(redis_conn):
    """Anyone who can write Redis can add members to a ScheduledJobRegistry: an id that is not
    UTF-8, one RQ refuses, one whose hash has no data. None of them stops the real retry."""
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    queue = Queue("default", connection=redis_conn, serializer=record.SERIALIZER)
    queue.remove(job.id)
    registry = ScheduledJobRegistry(queue=queue)
    registry.schedule(job, datetime.now(timezone.utc))
    redis_conn.hset("rq:job:no-data", "status", "scheduled")
    redis_conn.zadd(registry.key, {b"\xff\xfe": 0, "bad id with spaces": 0, "no-data": 0})
    assert retry_schedule.enqueue_due(redis_conn, ["default"]) == {"default": [job.id]}
    assert queue.get_job_ids() == [job.id] and redis_conn.zcard(registry.key) == 0
