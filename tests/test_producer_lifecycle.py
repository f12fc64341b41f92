"""A job's life as the producer sees it: status, list, info, results, wait, cancel, requeue.

Jobs run for real in an RQ ``SimpleWorker`` (JSON serializer, burst mode) on stand-in
task functions defined here. A "running" job is made with RQ's own API, the same calls a
worker makes when it starts a job.
"""

from __future__ import annotations

import threading
import time

import pytest
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry

from producer import Client, record
from producer.client import WaitTimeout
from producer.failures import FailureCode
from producer.settings import load_settings
from producer.status import failure_from_exc_string


def transcript(request: dict) -> dict:
    """Returns what the real worker returns: a JobResult-shaped dict."""
    return {"text": f"hello from {request['audio_uri']}", "segments": [{"start": 0.0, "end": 1.0, "text": "hello"}],
            "model": "gemma-4-e2b", "audio_seconds": 1.0, "timings": {"fetch": 0.01}, "worker": "test",
            "tokens": 3, "audio_tokens": 25, "metadata": request.get("metadata", {})}


def explode(request: dict) -> None:
    raise RuntimeError(f"decoder exploded on {request['audio_uri']}")


def sleep_long(request: dict) -> None:
    time.sleep(5)


@pytest.fixture
def client(redis_url, redis_conn):
    return Client(load_settings(redis_url=redis_url, environ={}), connection=redis_conn)


def run_jobs(client: Client, func: str, *uris: str, queue: str = "default") -> list[str]:
    """Enqueue through the client with a stand-in task, then drain the queue with a real worker."""
    client.task_func = f"{__name__}.{func}"
    ids = [client.enqueue({"audio_uri": uri}).job_id for uri in uris]
    SimpleWorker([client.queue(queue)], connection=client.connection, serializer="json").work(burst=True)
    return ids


def start_job(client: Client, job_id: str, ttl: int = 60) -> Job:
    """Move a queued job to ``started`` exactly as RQ's worker does when it picks it up."""
    job = Job.fetch(job_id, connection=client.connection, serializer="json")
    client.queue(job.origin).remove(job_id)
    with client.connection.pipeline() as pipe:
        job.prepare_for_execution("test-worker", pipeline=pipe)
        Execution.create(job, ttl=ttl, pipeline=pipe, worker_name="test-worker")
        pipe.execute()
    return job


# ----------------------------------------------------------------- queued jobs
def test_status_of_queued_jobs_has_position_and_request(client):
    a = client.enqueue({"audio_uri": "s3://audio/a.wav", "language": "fr"})
    b = client.enqueue({"audio_uri": "s3://audio/b.wav"})
    sa, sb = client.status_many([a.job_id, b.job_id])
    assert (sa.state, sa.queue, sa.position) == ("queued", "default", 0)
    assert sb.position == 1
    assert sa.request.language == "fr" and sa.enqueued_at is not None
    assert sa.result is None and sa.failure is None


def test_status_of_unknown_job_is_not_found(client):
    assert client.status("aq-missing").state == "not_found"
    with pytest.raises(ValueError):
        client.status("not/an/id")


def test_list_queued_jobs_by_queue_with_limit_and_offset(client):
    ids = [client.enqueue({"audio_uri": f"s3://audio/{i}.wav"}).job_id for i in range(5)]
    high = client.enqueue({"audio_uri": "s3://audio/h.wav"}, priority="high").job_id
    assert [s.id for s in client.list("queued", queue="default")] == ids
    assert [s.id for s in client.list("queued", queue="default", limit=2, offset=1)] == ids[1:3]
    assert [s.id for s in client.list("queued")] == [high, *ids]
    assert client.list("failed") == []
    with pytest.raises(ValueError):
        client.list("exploded")


def test_info_counts_queues_and_oldest_job(client):
    client.enqueue({"audio_uri": "s3://audio/a.wav"})
    client.enqueue({"audio_uri": "s3://audio/b.wav"}, priority="low")
    info = client.info()
    by_name = {q.name: q for q in info.queues}
    assert [q.name for q in info.queues][:3] == ["high", "default", "low"]
    assert (by_name["default"].queued, by_name["low"].queued, by_name["high"].queued) == (1, 1, 0)
    assert by_name["default"].oldest_queued_seconds >= 0
    assert by_name["high"].oldest_queued_seconds is None
    assert info.workers == []


def test_info_lists_a_live_worker(client):
    worker = SimpleWorker([client.queue("high"), client.queue("default")], connection=client.connection,
                          serializer="json", name="mac-mini")
    worker.register_birth()
    try:
        [w] = client.info().workers
        assert w.name == "mac-mini" and w.queues == ["high", "default"] and w.last_heartbeat is not None
    finally:
        worker.register_death()


# ------------------------------------------------------------ finished / failed
def test_finished_job_reads_back_its_result(client):
    [job_id] = run_jobs(client, "transcript", "s3://audio/a.wav")
    status = client.status(job_id)
    assert status.state == "finished" and status.failure is None
    assert status.result.text == "hello from s3://audio/a.wav" and status.result.audio_tokens == 25
    assert status.started_at is not None and status.ended_at is not None
    assert client.results([job_id]) == {job_id: status.result}
    assert [s.id for s in client.list("finished")] == [job_id]


def test_raw_exception_is_synthesised_as_model_error(client):
    [job_id] = run_jobs(client, "explode", "s3://audio/a.wav")
    status = client.status(job_id)
    assert status.state == "failed"
    assert status.failure.code == FailureCode.MODEL_ERROR
    assert status.failure.message == "RuntimeError: decoder exploded on s3://audio/a.wav"
    assert not status.failure.retryable and status.failure.worker
    assert [s.id for s in client.list("failed")] == [job_id]


def test_worker_written_failure_wins_over_the_exception(client):
    [job_id] = run_jobs(client, "explode", "s3://audio/a.wav")
    job = Job.fetch(job_id, connection=client.connection, serializer="json")
    job.meta[record.META_FAILURE] = {"code": "audio_not_found", "message": "no object s3://audio/a.wav",
                                     "retryable": False, "attempt": 1}
    job.save_meta()
    failure = client.status(job_id).failure
    assert (failure.code, failure.message) == (FailureCode.AUDIO_NOT_FOUND, "no object s3://audio/a.wav")


def test_rq_timeout_is_synthesised_as_timeout(client):
    job = client.queue("default").enqueue_call(f"{__name__}.sleep_long", args=({"audio_uri": "s3://a/b.wav"},),
                                               timeout=1, job_id="slow-job")
    SimpleWorker([client.queue("default")], connection=client.connection, serializer="json").work(burst=True)
    failure = client.status(job.id).failure
    assert failure.code == FailureCode.TIMEOUT and "maximum timeout" in failure.message


def test_abandoned_job_is_synthesised_as_worker_lost(client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    start_job(client, job_id, ttl=1)
    registry = StartedJobRegistry("default", connection=client.connection, serializer="json")
    registry.cleanup(timestamp=time.time() + 60)  # what another worker's maintenance does later
    failure = client.status(job_id).failure
    assert failure.code == FailureCode.WORKER_LOST and failure.retryable
    assert "AbandonedJobError" in failure.message


def test_failure_synthesis_from_exception_strings():
    assert failure_from_exc_string("Traceback ...\nValueError: bad\n").message == "ValueError: bad"
    assert failure_from_exc_string(None).code == FailureCode.MODEL_ERROR


def test_started_job_shows_progress_and_attempt(client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    job = start_job(client, job_id)
    job.meta[record.META_PROGRESS] = {"stage": "generate", "chunk": 2, "chunks": 5}
    job.meta[record.META_ATTEMPT] = 1
    job.save_meta()
    status = client.status(job_id)
    assert status.state == "started" and status.attempt == 1
    assert (status.progress.stage, status.progress.chunk, status.progress.chunks) == ("generate", 2, 5)
    assert [s.id for s in client.list("started")] == [job_id]


def test_job_put_back_by_the_worker_says_why(client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    job = Job.fetch(job_id, connection=client.connection, serializer="json")
    job.meta[record.META_RETRY] = {"code": "worker_lost", "message": "worker mac-1 stopped beating",
                                   "retryable": True, "attempt": 1}
    job.save_meta()
    status = client.status(job_id)
    assert status.state == "queued" and status.failure is None
    assert status.retry.code == FailureCode.WORKER_LOST


# -------------------------------------------------------------------------- wait
def test_wait_returns_terminal_statuses(client):
    [done] = run_jobs(client, "transcript", "s3://audio/a.wav")
    [failed] = run_jobs(client, "explode", "s3://audio/c.wav")
    seen = []
    statuses = client.wait([done, failed, "aq-missing"], timeout=5, poll=0.05, on_update=seen.append)
    assert [s.state for s in statuses] == ["finished", "failed", "not_found"]
    assert {s.id for s in seen} == {done, failed, "aq-missing"}


def test_wait_times_out_on_a_queued_job(client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    with pytest.raises(WaitTimeout) as caught:
        client.wait([job_id], timeout=0.2, poll=0.05)
    assert [s.state for s in caught.value.statuses] == ["queued"]


def test_wait_notices_a_change_made_elsewhere(client, redis_url):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    other = Client(client.settings)  # its own connection, as another process would have
    timer = threading.Timer(0.3, other.cancel, args=(job_id,))
    timer.start()
    try:
        [status] = client.wait([job_id], timeout=5, poll=0.05)
    finally:
        timer.join()
    assert status.state == "canceled"


# ------------------------------------------------------------------------ cancel
def test_cancel_queued_job(client, redis_conn):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    outcome = client.cancel(job_id)
    assert (outcome.action, outcome.state) == ("canceled", "canceled")
    status = client.status(job_id)
    assert status.state == "canceled" and status.failure.code == FailureCode.CANCELED
    assert redis_conn.llen("rq:queue:default") == 0
    assert [s.id for s in client.list("canceled")] == [job_id]
    assert 0 < redis_conn.ttl(f"rq:job:{job_id}") <= client.settings.failure_ttl
    assert not client.enqueue({"audio_uri": "s3://audio/a.wav"}).created  # still unique until it expires


def test_cancel_started_job_sets_the_cancel_key(client, redis_conn):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    start_job(client, job_id)
    outcome = client.cancel(job_id)
    assert (outcome.action, outcome.state) == ("cancel_requested", "started")
    assert redis_conn.exists(record.cancel_key(job_id))
    assert 0 < redis_conn.ttl(record.cancel_key(job_id)) <= client.cancel_key_ttl
    assert client.status(job_id).state == "started"


def test_worker_honoured_cancel_reads_as_canceled(client):
    [job_id] = run_jobs(client, "explode", "s3://audio/a.wav")
    job = Job.fetch(job_id, connection=client.connection, serializer="json")
    job.meta[record.META_FAILURE] = {"code": "canceled", "message": "canceled at stage generate",
                                     "retryable": False, "attempt": 1}
    job.save_meta()
    assert client.status(job_id).state == "canceled"


def test_cancel_finished_or_unknown_job_changes_nothing(client):
    [job_id] = run_jobs(client, "transcript", "s3://audio/a.wav")
    outcome = client.cancel(job_id)
    assert (outcome.action, outcome.state) == ("unchanged", "finished")
    assert client.cancel("aq-missing").action == "not_found"


# ----------------------------------------------------------------------- requeue
def test_requeue_failed_job_clears_failure_and_runs_again(client, redis_conn):
    [job_id] = run_jobs(client, "explode", "s3://audio/a.wav")
    job = Job.fetch(job_id, connection=redis_conn, serializer="json")
    job.meta.update({record.META_FAILURE: {"code": "storage_unavailable", "message": "503", "retryable": True,
                                           "attempt": 1},
                     record.META_PROGRESS: {"stage": "fetch"}, record.META_ATTEMPT: 1,
                     record.META_RETRY: {"code": "storage_unavailable", "message": "503", "retryable": True,
                                         "attempt": 1}})
    job.save_meta()
    redis_conn.set(record.cancel_key(job_id), "1")

    [outcome] = client.requeue([job_id])
    assert outcome.action == "requeued"
    status = client.status(job_id)
    assert (status.state, status.position, status.failure, status.attempt) == ("queued", 0, None, 1)
    meta = Job.fetch(job_id, connection=redis_conn, serializer="json").meta
    assert not {record.META_FAILURE, record.META_PROGRESS, record.META_RETRY} & set(meta)
    assert not redis_conn.exists(record.cancel_key(job_id))
    assert redis_conn.ttl(f"rq:job:{job_id}") == -1
    assert client.list("failed") == []

    SimpleWorker([client.queue("default")], connection=redis_conn, serializer="json").work(burst=True)
    assert client.status(job_id).state == "failed"  # it ran again (and exploded again)
    assert len(Job.fetch(job_id, connection=redis_conn, serializer="json").results()) == 2


def test_requeue_all_failed_and_canceled(client):
    failed = run_jobs(client, "explode", "s3://audio/a.wav", "s3://audio/b.wav")
    canceled = client.enqueue({"audio_uri": "s3://audio/c.wav"}).job_id
    client.cancel(canceled)
    outcomes = client.requeue(all_failed=True)
    assert sorted(o.job_id for o in outcomes) == sorted(failed)
    assert client.requeue([canceled])[0].action == "requeued"
    assert client.status(canceled).state == "queued" and client.status(canceled).failure is None
    assert client.requeue([canceled])[0].action == "unchanged"
    with pytest.raises(ValueError):
        client.requeue()
