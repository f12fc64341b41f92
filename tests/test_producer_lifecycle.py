"""A job's life as the producer sees it: status, list, info, results, wait, cancel, requeue.

Every job that runs, runs in the real audioq worker with the real Gemma 4 engine (tiny
random-weight e2b checkpoint) on real audio written here: ``AudioWorker`` in burst mode in
this process (``run_burst``), or ``run_worker`` in a subprocess when a test is about a job
that is running. Everything is read back through the producer's ``Client``. Failures come
from real bad inputs (a missing file, a text file, storage that is down), from a real
cancel honoured by the worker, or from a worker process that was SIGKILLed mid-job.

Running jobs run on ``long_tone`` with a 2048-token budget (~13 s of generation, see
worker_fixtures), so they are still generating whenever a test looks at, cancels or
orphans them; no test waits for one to finish.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
from conftest import make_tone
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.worker import Worker
from worker_fixtures import (TEST_DEFAULT_MAX_NEW_TOKENS, closed_endpoint, long_tone, run_burst, start_worker,
                             wait_for, worker_settings, write_wav)

from producer import Client, record
from producer.client import WaitTimeout
from producer.failures import FailureCode
from producer.status import JobStatus, failure_from_exc_string
from worker import reaper
from worker.gemma4.features import audio_token_count

LONG_RUN = 2048  # tokens on long_tone: ~13 s, longer than any test looks at a running job


@pytest.fixture
def settings(redis_url):
    """One set of settings for the producer and the workers, with test-sized liveness times."""
    return worker_settings(redis_url)


@pytest.fixture
def client(settings, redis_conn):
    return Client(settings, connection=redis_conn)


@pytest.fixture
def wav(tmp_path) -> Path:
    return write_wav(tmp_path / "speech.wav", make_tone(1.0))


@pytest.fixture
def long_wav(tmp_path) -> Path:
    return long_tone(tmp_path / "long.wav")


def request_for(audio: Path | str | dict) -> dict:
    if isinstance(audio, dict):
        return audio
    return {"audio_uri": audio.as_uri() if isinstance(audio, Path) else audio}


def run_jobs(client: Client, engine, *audio: Path | str | dict) -> list[str]:
    """Enqueue through the client, then drain the queues with a real audioq worker in burst mode."""
    ids = [client.enqueue(request_for(a)).job_id for a in audio]
    run_burst(client.settings, engine)
    return ids


def text_file(path: Path) -> Path:
    path.write_text("not audio at all\n" * 10)
    return path


def stored_job(client: Client, job_id: str) -> Job:
    return Job.fetch(job_id, connection=client.connection, serializer=record.SERIALIZER)


# ------------------------------------------------------------------ worker subprocesses
@pytest.fixture
def workers(redis_conn, settings, tiny_checkpoint, tmp_path):
    """Start ``run_worker`` subprocesses on the tiny checkpoint; killed (before Redis is flushed) at the end.

    ``start()`` returns (process, worker name) once the worker is registered and waiting for jobs.
    """
    model_settings = settings.model_copy(update={"model": str(tiny_checkpoint())})
    started = []

    def state_of(name: str) -> str | None:
        return {w.name: w.get_state() for w in Worker.all(connection=redis_conn)}.get(name)

    def start():
        log = tmp_path / f"worker{len(started)}.log"
        proc = start_worker(model_settings, log)
        started.append(proc)
        name = f"{socket.gethostname()}-{proc.pid}"  # run_worker's default name
        wait_for(lambda: proc.poll() is not None or state_of(name) == "idle", timeout=60,
                 what="the worker to be up and idle")
        assert proc.poll() is None, log.read_text()[-2000:]
        return proc, name

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def generating(client: Client, job_id: str) -> JobStatus | None:
    status = client.status(job_id)
    return status if status.progress is not None and status.progress.stage == "generate" else None


def start_generating(client: Client, long_wav: Path) -> JobStatus:
    """Enqueue a long job and wait until a worker is generating it; returns that status."""
    job_id = client.enqueue({"audio_uri": long_wav.as_uri(), "max_new_tokens": LONG_RUN}).job_id
    return wait_for(lambda: generating(client, job_id), timeout=30, what="the job to be generating")


def orphan_a_running_job(client: Client, workers, long_wav: Path) -> tuple[str, str]:
    """A job whose worker was SIGKILLed while generating it: (job id, the dead worker's name)."""
    proc, name = workers()
    job_id = start_generating(client, long_wav).id
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert client.status(job_id).state == "started"  # RQ alone still says so
    return job_id, name


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


# ---------------------------------------------------------------- running jobs
def test_info_and_status_show_a_live_worker_and_its_running_job(client, workers, long_wav):
    proc, name = workers()
    [w] = client.info().workers
    assert (w.name, w.state, w.current_job, w.queues) == (name, "idle", None, ["high", "default", "low"])
    assert w.last_heartbeat is not None

    status = start_generating(client, long_wav)
    assert (status.state, status.queue, status.attempt, status.position) == ("started", "default", 1, None)
    assert (status.progress.chunk, status.progress.chunks) == (1, 1)  # a short clip is one chunk
    assert status.started_at is not None and status.ended_at is None and status.failure is None
    assert status.request.max_new_tokens == LONG_RUN
    assert [s.id for s in client.list("started")] == [status.id]
    info = client.info()
    [w] = info.workers
    assert (w.name, w.state, w.current_job) == (name, "busy", status.id)
    default = {q.name: q for q in info.queues}["default"]
    assert (default.queued, default.started, default.finished) == (0, 1, 0)
    assert proc.poll() is None and client.status(status.id).state == "started"  # still generating


def test_cancel_of_a_running_job_is_carried_out_by_the_worker(client, redis_conn, workers, long_wav):
    proc, name = workers()
    job_id = start_generating(client, long_wav).id
    asked = time.monotonic()
    outcome = client.cancel(job_id)
    assert (outcome.action, outcome.state) == ("cancel_requested", "started")
    assert 0 < redis_conn.ttl(record.cancel_key(job_id)) <= client.cancel_key_ttl

    [status] = client.wait([job_id], timeout=15, poll=0.05)
    assert time.monotonic() - asked < 5  # the worker stopped it mid-generation, not after 2048 tokens
    assert status.state == "canceled"  # RQ filed it as failed; the failure code makes it canceled
    failure = status.failure
    assert failure.code == FailureCode.CANCELED and "at stage generate" in failure.message
    assert (failure.worker, failure.attempt, failure.retryable) == (name, 1, False)
    assert stored_job(client, job_id).get_status() == "failed"
    assert [s.id for s in client.list("failed")] == [job_id] and client.list("canceled") == []
    assert client.cancel(job_id).action == "unchanged"
    # The worker lives on, idle, with the job counted as failed.
    [w] = wait_for(lambda: [w for w in client.info().workers if w.state == "idle"], what="the worker to be idle")
    assert (w.name, w.current_job, w.failed_jobs) == (name, None, 1) and proc.poll() is None


def test_job_put_back_by_the_worker_says_why(client, settings, workers, long_wav):
    """The reaper (every worker's maintenance round, called here as one) requeues the job of a dead worker."""
    job_id, dead = orphan_a_running_job(client, workers, long_wav)
    wait_for(lambda: not client.connection.exists(record.beat_key(job_id)), timeout=10,
             what="the dead worker's beat to expire")
    assert reaper.sweep(client.connection, settings.queues, settings, "sweeper") == {job_id: "requeued"}
    status = client.status(job_id)
    assert (status.state, status.position, status.failure, status.progress, status.attempt) == \
        ("queued", 0, None, None, 1)
    assert status.retry.code == FailureCode.WORKER_LOST and status.retry.retryable
    assert status.retry.worker == dead and "at stage generate" in status.retry.message


# ------------------------------------------------------------ finished / failed
def test_finished_job_reads_back_its_result(client, engine, wav):
    [job_id] = run_jobs(client, engine, {"audio_uri": wav.as_uri(), "metadata": {"batch": 7}})
    status = client.status(job_id)
    assert status.state == "finished" and status.failure is None, status.failure
    job = stored_job(client, job_id)
    assert status.result.model_dump(mode="json") == job.return_value()  # what the worker wrote, whole
    result = status.result
    assert 1 <= result.tokens <= TEST_DEFAULT_MAX_NEW_TOKENS and result.model == engine.model_id
    assert result.audio_seconds == 1.0 and result.audio_tokens == audio_token_count(16_000)
    assert result.metadata == {"batch": 7} and result.worker == job.worker_name
    assert status.attempt == 1 and status.progress is None
    assert status.started_at is not None and status.ended_at >= status.started_at
    assert client.results([job_id]) == {job_id: result}
    assert [s.id for s in client.list("finished")] == [job_id]


def test_failures_from_bad_inputs_read_back_with_their_code(client, engine, tmp_path):
    missing, notes = tmp_path / "missing.wav", text_file(tmp_path / "notes.wav")
    ids = run_jobs(client, engine, missing, notes)
    statuses = client.status_many(ids)
    assert [s.state for s in statuses] == ["failed", "failed"]
    assert [s.failure.code for s in statuses] == [FailureCode.AUDIO_NOT_FOUND, FailureCode.UNSUPPORTED_FORMAT]
    assert "no such file" in statuses[0].failure.message
    assert "not a recognised audio file" in statuses[1].failure.message
    for status in statuses:
        job = stored_job(client, status.id)
        assert status.failure.model_dump(mode="json") == job.meta[record.META_FAILURE]
        assert (status.failure.attempt, status.failure.retryable, status.failure.worker) == (1, False, job.worker_name)
        # The worker's own failure wins: RQ's exc_string alone would only say model_error.
        assert failure_from_exc_string(job.latest_result().exc_string).code == FailureCode.MODEL_ERROR
    assert client.results(ids) == {s.id: s.failure for s in statuses}
    assert sorted(s.id for s in client.list("failed")) == sorted(ids)


def test_abandoned_job_is_synthesised_as_worker_lost(client, workers, long_wav):
    """A dead worker's job that no audioq reaper saw, failed by RQ's own registry cleanup.

    RQ writes the failure (``AbandonedJobError``) without audioq's meta failure, so the
    producer synthesises one from RQ's text.
    """
    job_id, dead = orphan_a_running_job(client, workers, long_wav)
    registry = StartedJobRegistry("default", connection=client.connection, serializer=record.SERIALIZER)
    [(entry, expires)] = client.connection.zrange(registry.key, 0, -1, withscores=True)
    assert entry.decode().startswith(f"{job_id}:") and expires > time.time()
    registry.cleanup()  # not expired yet: nothing happens
    assert client.status(job_id).state == "started"
    registry.cleanup(timestamp=expires + 1)  # RQ's maintenance, run the moment the entry has expired
    status = client.status(job_id)
    assert status.state == "failed" and stored_job(client, job_id).meta.get(record.META_FAILURE) is None
    failure = status.failure
    assert failure.code == FailureCode.WORKER_LOST and failure.retryable
    # In audioq's words: RQ's ("Moved to FailedJobRegistry, due to AbandonedJobError") tell a user nothing.
    assert failure.message == (f"worker {dead} stopped while running the job and RQ's cleanup failed it; "
                               f"`audioq requeue` runs it again")
    assert (failure.worker, failure.attempt) == (dead, 1)
    assert [s.id for s in client.list("failed")] == [job_id] and client.list("started") == []


def rq_exc_string(fail) -> str:
    """The exc_string RQ's worker stores for an exception raised out of a job: the formatted
    traceback, ``''.join(traceback.format_exception(*sys.exc_info()))`` (rq.worker.base)."""
    try:
        fail()
    except (RuntimeError, JobTimeoutException):
        return "".join(traceback.format_exception(*sys.exc_info()))
    raise AssertionError(f"{fail} did not raise")


def test_failure_synthesis_from_rq_exception_strings():
    """Failures RQ wrote that cannot arise for real with the audioq worker any more.

    ``process_audio_job`` and ``AudioWorker.handle_exception`` put a meta failure on the
    record for every exception, RQ's hard timeout (``JobTimeoutException``) included, and
    the worker raises every job's timeout well before RQ's hard limit. So a raw exception
    or a timeout without a meta failure is only tested here, on RQ's exact strings: the
    traceback RQ formats, and the timeout raised by RQ's own death penalty. (The abandoned
    job is produced for real above.)
    """
    def explode():
        raise RuntimeError("decoder exploded on s3://audio/a.wav")

    raw = rq_exc_string(explode)
    assert raw.startswith("Traceback (most recent call last):\n")
    failure = failure_from_exc_string(raw, attempt=2, worker="mac-1")
    assert (failure.code, failure.message) == (FailureCode.MODEL_ERROR,
                                               "RuntimeError: decoder exploded on s3://audio/a.wav")
    assert (failure.attempt, failure.worker, failure.retryable) == (2, "mac-1", False)

    hard_limit = rq_exc_string(
        lambda: UnixSignalDeathPenalty(1, JobTimeoutException).handle_death_penalty(signal.SIGALRM, None))
    failure = failure_from_exc_string(hard_limit)
    assert failure.code == FailureCode.TIMEOUT and not failure.retryable
    assert failure.message == "rq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (1 seconds)"

    assert failure_from_exc_string(None).code == FailureCode.MODEL_ERROR
    assert failure_from_exc_string("").message == "the job failed without an error message"


# -------------------------------------------------------------------------- wait
def test_wait_follows_jobs_to_their_end(client, engine, wav, tmp_path):
    done = client.enqueue({"audio_uri": wav.as_uri()}).job_id
    failed = client.enqueue({"audio_uri": (tmp_path / "missing.wav").as_uri()}).job_id
    seen: list[JobStatus] = []
    returned: dict[str, list[JobStatus]] = {}
    waiter = threading.Thread(target=lambda: returned.update(
        statuses=client.wait([done, failed, "aq-missing"], timeout=30, poll=0.02, on_update=seen.append)))
    waiter.start()
    wait_for(lambda: {s.id for s in seen} == {done, failed, "aq-missing"}, what="wait's first look")
    run_burst(client.settings, engine)
    waiter.join(30)
    assert not waiter.is_alive()
    assert [s.state for s in returned["statuses"]] == ["finished", "failed", "not_found"]
    assert returned["statuses"][1].failure.code == FailureCode.AUDIO_NOT_FOUND
    for job_id, end in ((done, "finished"), (failed, "failed")):
        states = [s.state for s in seen if s.id == job_id]
        assert states[0] == "queued" and states[-1] == end  # it waited through the run


def test_wait_times_out_on_a_queued_job(client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    with pytest.raises(WaitTimeout) as caught:
        client.wait([job_id], timeout=0.2, poll=0.05)
    assert [s.state for s in caught.value.statuses] == ["queued"]


def test_wait_notices_a_change_made_elsewhere(client):
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


def test_cancel_finished_or_unknown_job_changes_nothing(client, engine, wav):
    [job_id] = run_jobs(client, engine, wav)
    outcome = client.cancel(job_id)
    assert (outcome.action, outcome.state) == ("unchanged", "finished")
    assert client.status(job_id).result is not None
    assert client.cancel("aq-missing").action == "not_found"


# ----------------------------------------------------------------------- requeue
def test_requeue_failed_job_clears_failure_and_runs_again(client, engine, tmp_path):
    late = tmp_path / "late.wav"
    [job_id] = run_jobs(client, engine, late)
    assert client.status(job_id).failure.code == FailureCode.AUDIO_NOT_FOUND
    meta = stored_job(client, job_id).meta
    assert {record.META_FAILURE, record.META_PROGRESS} <= set(meta)
    assert 0 < client.connection.ttl(Job.key_for(job_id)) <= client.settings.failure_ttl

    write_wav(late, make_tone(1.0))  # the missing file arrives
    [outcome] = client.requeue([job_id])
    assert outcome.action == "requeued"
    status = client.status(job_id)
    assert (status.state, status.position, status.failure, status.attempt) == ("queued", 0, None, 1)
    meta = stored_job(client, job_id).meta
    assert not {record.META_FAILURE, record.META_PROGRESS, record.META_RETRY} & set(meta)
    assert client.connection.ttl(Job.key_for(job_id)) == -1
    assert client.list("failed") == []

    run_burst(client.settings, engine)
    status = client.status(job_id)
    assert (status.state, status.attempt, status.failure) == ("finished", 2, None)  # it ran again, for real
    assert status.result.audio_seconds == 1.0
    assert [r.type.name for r in stored_job(client, job_id).results()] == ["SUCCESSFUL", "FAILED"]


def storage_down(client):
    """The client's settings with S3 on a closed port and one storage retry."""
    return client.settings.model_copy(update={"s3_endpoint_url": closed_endpoint(), "storage_retries": 1})


def fail_through_a_storage_outage(client, engine, s3_bucket, wav) -> str:
    """A job whose storage stayed down through its one retry: failed, storage_unavailable."""
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="speech.wav", Body=wav.read_bytes())
    down = storage_down(client)
    job_id = client.enqueue({"audio_uri": f"s3://{bucket}/speech.wav"}).job_id
    run_burst(down, engine)
    status = client.status(job_id)
    assert (status.state, status.failure.code, status.attempt) == ("failed", FailureCode.STORAGE_UNAVAILABLE, 2)
    return job_id


def test_requeue_clears_the_storage_retry_note(client, engine, s3_bucket, wav):
    """Storage was down through every retry; once it is back, the requeued job runs clean."""
    s3, _ = s3_bucket
    job_id = fail_through_a_storage_outage(client, engine, s3_bucket, wav)
    assert record.META_RETRY in stored_job(client, job_id).meta  # the first attempt's note

    assert client.requeue([job_id])[0].action == "requeued"
    status = client.status(job_id)
    assert (status.state, status.failure, status.retry) == ("queued", None, None)
    assert record.META_RETRY not in stored_job(client, job_id).meta

    run_burst(client.settings.model_copy(update={"s3_endpoint_url": s3.meta.endpoint_url, "s3_region": "us-east-1"}),
              engine)
    status = client.status(job_id)
    assert (status.state, status.attempt, status.retry) == ("finished", 3, None)
    assert record.META_RETRY not in stored_job(client, job_id).meta


def run_one_job(settings, engine) -> None:
    """A real AudioWorker that takes exactly one job, then stops (even if a retry is scheduled)."""
    import redis

    from worker.process import AudioWorker

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = AudioWorker(settings.queues, settings=settings, engine=engine,
                         connection=redis.Redis.from_url(settings.redis_url))
    try:
        worker.work(burst=True, max_jobs=1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_requeued_job_gets_its_storage_retries_again(client, engine, s3_bucket, wav):
    """Storage down through every retry → failed; requeued while still down → retried, not failed.

    RQ counts a job's retries in ``number_of_retries``, and the worker retries storage
    failures only while it is below ``storage_retries``; a requeue that kept the count
    would leave the job no retry at all.
    """
    job_id = fail_through_a_storage_outage(client, engine, s3_bucket, wav)
    assert stored_job(client, job_id).number_of_retries == 1  # its one retry, spent

    assert client.requeue([job_id])[0].action == "requeued"
    job = stored_job(client, job_id)
    assert job.number_of_retries is None and not client.connection.hexists(job.key, "number_of_retries")

    # Still down: the requeued attempt fails on storage again and is scheduled for a retry.
    run_one_job(storage_down(client).model_copy(update={"storage_retry_backoff": [60.0]}), engine)
    status = client.status(job_id)
    assert (status.state, status.attempt, status.failure) == ("scheduled", 3, None), status.failure
    assert status.retry.code == FailureCode.STORAGE_UNAVAILABLE
    job = stored_job(client, job_id)
    assert job.number_of_retries == 1 and job.latest_result().type.name == "RETRIED"
    assert [s.id for s in client.list("scheduled")] == [job_id]


def test_info_counts_only_canceled_jobs_that_still_exist(redis_url, redis_conn):
    """RQ never cleans CanceledJobRegistry: a canceled job's record expires, its entry would stay."""
    short = Client(worker_settings(redis_url, failure_ttl=1), connection=redis_conn)
    gone = short.enqueue({"audio_uri": "s3://audio/gone.wav"}).job_id
    short.cancel(gone)
    lasting = Client(worker_settings(redis_url), connection=redis_conn)
    kept = lasting.enqueue({"audio_uri": "s3://audio/kept.wav"}).job_id
    lasting.cancel(kept)
    registry = "rq:canceled:default"
    assert redis_conn.zcard(registry) == 2
    wait_for(lambda: not redis_conn.exists(Job.key_for(gone)), timeout=5, what="the canceled job to expire")
    assert redis_conn.zcard(registry) == 2  # the stale entry is still there

    counts = {q.name: q.canceled for q in lasting.info().queues}
    assert counts == {"high": 0, "default": 1, "low": 0}
    assert [v.decode() for v in redis_conn.zrange(registry, 0, -1)] == [kept]  # pruned, the live one kept
    assert [s.id for s in lasting.list("canceled", limit=1)] == [kept]


def test_list_and_wait_refuse_out_of_range_numbers(client):
    """``offset=-1`` would slice from the end of the page; ``poll=0`` would busy-loop on Redis."""
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": -5}, {"offset": 1.5}):
        with pytest.raises(ValueError, match="limit|offset"):
            client.list(**bad)
    for bad in ({"poll": 0}, {"poll": -1}, {"poll": float("nan")}, {"timeout": -1}):
        with pytest.raises(ValueError, match="poll|timeout"):
            client.wait([job_id], **bad)
    assert [s.id for s in client.list(offset=0, limit=1)] == [job_id]


def test_requeue_all_failed_and_canceled(client, engine, tmp_path):
    a, b, c = (tmp_path / f"{name}.wav" for name in "abc")
    failed = run_jobs(client, engine, a, b)
    assert {client.status(job_id).failure.code for job_id in failed} == {FailureCode.AUDIO_NOT_FOUND}
    canceled = client.enqueue({"audio_uri": c.as_uri()}).job_id
    client.cancel(canceled)
    assert client.connection.exists(record.cancel_key(canceled))

    outcomes = client.requeue(all_failed=True)
    assert sorted(o.job_id for o in outcomes) == sorted(failed)
    assert {o.action for o in outcomes} == {"requeued"}
    assert client.requeue([canceled])[0].action == "requeued"
    assert client.status(canceled).state == "queued" and client.status(canceled).failure is None
    assert not client.connection.exists(record.cancel_key(canceled))
    assert client.requeue([canceled])[0].action == "unchanged"
    with pytest.raises(ValueError):
        client.requeue()

    for path in (a, b, c):
        write_wav(path, make_tone(1.0))
    run_burst(client.settings, engine)
    # All three ran: the canceled one was not stopped again at its claim by a stale cancel key.
    assert [s.state for s in client.status_many([*failed, canceled])] == ["finished"] * 3
