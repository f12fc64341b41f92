"""A worker holding several jobs at once: each keeps its own RQ record, fails alone, and is never lost.

Workers run as real subprocesses (``run_worker`` on the tiny e2b checkpoint) or in this
process (``run_burst``), against real Redis: the shared test database, or a redis-server of
the test's own (AOF on) when the test restarts it. Jobs on ``long_tone`` generate exactly
their ``max_new_tokens`` (5-15 ms a token, by machine), which sets how long a job stays in the
engine while the test looks at the others.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time

import pytest
import redis
from conftest import OutOfMemoryOnce, make_tone
from demo import AofRedis
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from worker_fixtures import (enqueue, failure_code, fetch, long_tone, procs, run_burst,  # noqa: F401
                             start_worker, strand, wait_for, worker_settings, write_wav)

from producer import record

LONG_RUN = 600  # tokens, ~3-4 s: the job in the engine while the others are looked at
SHORT_RUN = 40


@pytest.fixture
def model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint())


@pytest.fixture
def requests(tmp_path):
    """Request makers: a long job (on long_tone), short good ones, and one whose file is not audio."""
    long_uri = long_tone(tmp_path / "long.wav").as_uri()
    short = write_wav(tmp_path / "short.wav", make_tone(1.0)).as_uri()
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"\x07" * 4096)
    return {"long": lambda tokens=LONG_RUN: {"audio_uri": long_uri, "max_new_tokens": tokens},
            "short": lambda n: {"audio_uri": short, "max_new_tokens": SHORT_RUN, "metadata": {"n": n}},
            "bad": {"audio_uri": bad.as_uri()}}


def started_ids(connection, queue: str = "default") -> set[str]:
    return set(StartedJobRegistry(queue, connection=connection).get_job_ids(cleanup=False))


def backlog(connection, requests, shorts: int) -> tuple:
    """A long job first, then the bad one, then ``shorts`` good short ones, all on the default queue."""
    long = enqueue(connection, requests["long"]())
    bad = enqueue(connection, requests["bad"])
    short = [enqueue(connection, requests["short"](n), job_id=f"short-{n}") for n in range(shorts)]
    return long, bad, short


def test_several_jobs_are_started_at_once_each_with_its_own_record_and_a_bad_one_fails_alone(
        redis_url, redis_conn, model, requests, tmp_path, procs):
    settings = worker_settings(redis_url, model=model, prefetch_jobs=3)
    long, bad, short = backlog(redis_conn, requests, shorts=3)
    procs.append(worker := start_worker(settings, tmp_path / "worker.log", burst=True))
    wait_for(lambda: fetch(redis_conn, long.id).get_meta().get(record.META_PROGRESS, {}).get("stage") == "generate",
             timeout=60, what="the long job to be generating")
    # While the long job generates, the jobs claimed behind it show as started too, each with
    # its own execution in RQ's started registry and its own beat.
    held = wait_for(lambda: (ids := started_ids(redis_conn)) >= {long.id, short[0].id, short[1].id} and ids,
                    what="several jobs started at once")
    assert all(redis_conn.exists(record.beat_key(job_id)) for job_id in held)
    executions = StartedJobRegistry("default", connection=redis_conn).get_job_and_execution_ids(cleanup=False)
    assert len({execution for _, execution in executions}) == len(executions) >= 3
    assert worker.wait(timeout=60) == 0

    bad = fetch(redis_conn, bad.id)
    assert bad.get_status() == "failed" and failure_code(bad) == "unsupported_format"
    assert bad.ended_at < fetch(redis_conn, long.id).ended_at  # it failed while the long job still ran
    assert bad.latest_result().exc_string.startswith("unsupported_format: ")
    for job, tokens in [(long, LONG_RUN)] + [(job, SHORT_RUN) for job in short]:
        job = fetch(redis_conn, job.id)
        assert job.get_status() == "finished" and job.return_value()["tokens"] == tokens
        assert len(job.results()) == 1 and job.get_meta()[record.META_ATTEMPT] == 1
    assert set(FinishedJobRegistry("default", connection=redis_conn).get_job_ids()) == {long.id, *(j.id for j in short)}
    assert FailedJobRegistry("default", connection=redis_conn).get_job_ids() == [bad.id]
    assert not started_ids(redis_conn) and not redis_conn.keys(record.beat_key("*"))
    assert "warm-up" in (tmp_path / "worker.log").read_text()


def test_a_high_priority_job_joins_the_running_batch_instead_of_waiting_for_it_to_drain(
        redis_url, redis_conn, model, requests, tmp_path, procs):
    """A high-priority job enqueued while the batch runs ends before the last of the jobs the worker
    had already taken: it is taken at the engine's next step and runs ahead of lower-priority clips
    (with a batched engine it runs beside the long job; one clip at a time, right after it)."""
    settings = worker_settings(redis_url, model=model, prefetch_jobs=3)
    long = enqueue(redis_conn, requests["long"]())
    default = [enqueue(redis_conn, requests["short"](n), job_id=f"short-{n}") for n in range(6)]
    procs.append(worker := start_worker(settings, tmp_path / "worker.log", burst=True))
    wait_for(lambda: fetch(redis_conn, long.id).get_meta().get(record.META_PROGRESS, {}).get("stage") == "generate",
             timeout=60, what="the long job to be generating")
    taken = started_ids(redis_conn)
    assert len(taken) > 1  # the batch holds more than the long job
    urgent = enqueue(redis_conn, requests["short"]("urgent"), queue="high", job_id="urgent")
    assert worker.wait(timeout=90) == 0
    ended = {job.id: fetch(redis_conn, job.id).ended_at for job in [long, *default, urgent]}
    assert fetch(redis_conn, urgent.id).get_status() == "finished"
    assert ended[urgent.id] < max(ended[job_id] for job_id in taken)


def test_a_jobs_deadline_counts_its_own_share_of_the_batch_not_its_wait_for_the_others(
        redis_url, redis_conn, engine, requests):
    """One job in the engine at a time, seven claimed at once: the last waits for six others, longer
    than its whole budget, and still finishes; the first runs past the budget on its own and times
    out alone."""
    budget = 8.0  # a 300-token job takes 2-4 s here, more under load: room, and still far below six of them
    settings = worker_settings(redis_url, batch_max_jobs=1, prefetch_jobs=6, job_timeout_base=budget,
                               job_timeout_per_audio_second=0.0)
    overrun = enqueue(redis_conn, requests["long"](2048))  # ~13 s alone
    queued = [enqueue(redis_conn, requests["long"](300), job_id=f"queued-{n}") for n in range(6)]  # ~2 s each
    run_burst(settings, engine)

    overrun = fetch(redis_conn, overrun.id)
    assert overrun.get_status() == "failed" and failure_code(overrun) == "timeout"
    assert f"past its budget of {budget:.1f} s" in overrun.get_meta()[record.META_FAILURE]["message"]
    for job in queued:
        job = fetch(redis_conn, job.id)
        assert job.get_status() == "finished" and job.return_value()["tokens"] == 300
    waits = [(job.ended_at - job.started_at).total_seconds() for job in (fetch(redis_conn, j.id) for j in queued)]
    assert max(waits) > budget  # the last to run finished later than its budget after its claim


def test_jobs_waiting_in_a_batch_past_the_hard_time_limit_are_not_taken_for_lost(redis_url, redis_conn, engine,
                                                                                 requests):
    """The beat stops for a job past ``hard_timeout`` (the main thread must be stuck), counted as
    its deadline is: a job that merely waits behind the others keeps its beat, is not requeued
    as lost while it is held, and runs once."""
    pace = enqueue(redis_conn, requests["long"](100), job_id="pace")  # one job alone: this machine's pace
    run_burst(worker_settings(redis_url, batch_max_jobs=1), engine)
    pace = fetch(redis_conn, pace.id)
    alone = (pace.ended_at - pace.started_at).total_seconds()
    hard = max(2, math.ceil(2 * alone))  # a job's own run fits twice; the sixth in line waits ~5 runs
    settings = worker_settings(redis_url, batch_max_jobs=1, prefetch_jobs=5, test_hard_timeout=hard, lost_after=1.0)
    jobs = [enqueue(redis_conn, requests["long"](100), job_id=f"queued-{n}") for n in range(6)]
    run_burst(settings, engine)
    jobs = [fetch(redis_conn, job.id) for job in jobs]
    assert max((job.ended_at - job.started_at).total_seconds() for job in jobs) > settings.hard_timeout
    for job in jobs:
        assert job.get_status() == "finished" and len(job.results()) == 1
        assert record.META_LOST not in job.get_meta() and job.get_meta()[record.META_ATTEMPT] == 1


def test_a_tower_batch_that_runs_out_of_memory_fails_no_job(redis_url, redis_conn, engine, tmp_path):
    """Both chunks of a long job share a tower call that runs out of memory: the job still finishes
    (one at a time, each chunk would have come back alone to a worker that then saw one row in the
    engine and failed it)."""
    from worker.gemma4.engine import Engine

    tower = OutOfMemoryOnce(engine.model.audio_tower, lambda features, mask: features.shape[0] > 1)
    splitting = Engine(dataclasses.replace(engine.model, audio_tower=tower), padding_slack=8.0)
    path = write_wav(tmp_path / "tone.wav", make_tone(16.0, seed=3), subtype="FLOAT")
    job = enqueue(redis_conn, {"audio_uri": path.as_uri(), "max_new_tokens": 4})
    run_burst(worker_settings(redis_url, max_chunk_seconds=8.0, min_chunk_seconds=3.0), splitting)
    job = fetch(redis_conn, job.id)
    assert tower.failures == 1
    assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)


def test_a_worker_sigkilled_mid_batch_loses_none_of_its_jobs(redis_url, redis_conn, model, requests, tmp_path,
                                                             procs):
    """Every job the dead worker held is resolved on its own (here, lost_job_retries 0: worker_lost);
    the jobs it never claimed are run by the survivor."""
    settings = worker_settings(redis_url, model=model, prefetch_jobs=3, lost_after=2.0, lost_job_retries=0)
    doomed = start_worker(settings, tmp_path / "doomed.log")
    procs.append(doomed)
    wait_for(lambda: SimpleWorker.count(connection=redis_conn) == 1, timeout=60, what="the worker to register")
    long = enqueue(redis_conn, requests["long"](2048))
    others = [enqueue(redis_conn, requests["long"](), job_id=f"other-{n}") for n in range(6)]
    wait_for(lambda: fetch(redis_conn, long.id).get_meta().get(record.META_PROGRESS, {}).get("stage") == "generate",
             timeout=60, what="the long job to be generating")
    held = wait_for(lambda: len(ids := started_ids(redis_conn)) >= 4 and ids, what="the worker to hold 4 jobs")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    procs.append(survivor := start_worker(settings, tmp_path / "survivor.log", burst=True))
    assert survivor.wait(timeout=90) == 0

    for job in [long, *others]:
        job = fetch(redis_conn, job.id)
        if job.id in held:
            assert job.get_status() == "failed" and failure_code(job) == "worker_lost"
            assert "lost 1 times" in job.get_meta()[record.META_FAILURE]["message"]
        else:
            assert job.get_status() == "finished" and job.return_value()["tokens"] == LONG_RUN
    assert not started_ids(redis_conn) and not Queue("default", connection=redis_conn).get_job_ids()


def test_a_warm_shutdown_finishes_the_started_job_and_puts_the_jobs_claimed_ahead_back_unrun(
        redis_url, redis_conn, model, requests, tmp_path, procs):
    """One job in the engine at a time (batch_max_jobs 1), three claimed ahead by the prefetch."""
    settings = worker_settings(redis_url, model=model, prefetch_jobs=3, batch_max_jobs=1)
    long = enqueue(redis_conn, requests["long"]())
    procs.append(worker := start_worker(settings, tmp_path / "worker.log"))
    wait_for(lambda: fetch(redis_conn, long.id).get_meta().get(record.META_PROGRESS, {}).get("stage") == "generate",
             timeout=60, what="the long job to be generating")
    # Enqueued once the long job holds the engine's one slot: none of them can start before it
    # (enqueued together, a short one could be prepared first and run first).
    ahead = [enqueue(redis_conn, requests["short"](n), job_id=f"short-{n}") for n in range(3)]
    wait_for(lambda: len(started_ids(redis_conn)) == 4, what="the jobs claimed ahead")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert fetch(redis_conn, long.id).return_value()["tokens"] == LONG_RUN
    assert Queue("default", connection=redis_conn).get_job_ids() == [job.id for job in ahead]  # in their order
    for job in ahead:
        job = fetch(redis_conn, job.id)
        assert job.get_status() == "queued" and record.META_ATTEMPT not in job.get_meta()  # as if never taken
        assert not job.get_executions() and not redis_conn.exists(record.beat_key(job.id))
    assert not started_ids(redis_conn)


def test_a_burst_worker_resolves_a_dead_workers_job_before_it_exits(redis_url, redis_conn, engine, requests):
    """The dead worker's job never beat; a burst worker on an otherwise empty queue requeues it and runs it."""
    settings = worker_settings(redis_url, lost_job_retries=1, heartbeat_interval=30.0, lost_after=60.0)
    job = strand(redis_conn, enqueue(redis_conn, requests["short"](0), settings=settings), settings)
    run_burst(settings, engine)  # its maintenance thread would not sweep for 30 s
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and job.get_meta()[record.META_LOST] == 1
    assert job.get_meta()[record.META_RETRY]["code"] == "worker_lost"


def test_a_burst_worker_fails_a_dead_workers_job_past_its_retries_before_it_exits(redis_url, redis_conn, engine,
                                                                                  requests):
    settings = worker_settings(redis_url, lost_job_retries=0, heartbeat_interval=30.0, lost_after=60.0)
    job = strand(redis_conn, enqueue(redis_conn, requests["short"](0), settings=settings), settings)
    run_burst(settings, engine)
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and failure_code(job) == "worker_lost"


# ------------------------------------------------------------------ Redis restarts
@pytest.fixture
def own_redis(tmp_path):
    server = AofRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def restart(server: AofRedis, down_for: float = 1.0) -> float:
    """Stop Redis, wait, start it again; returns time.monotonic() when it answers again."""
    server.stop()
    time.sleep(down_for)
    server.start()
    return time.monotonic()


def test_workers_ride_out_a_redis_restart_under_load(own_redis, model, requests, tmp_path, procs):
    """Two workers, each holding jobs, while Redis is restarted (AOF on, so the records survive):
    both stay up and every job ends finished, run and recorded exactly once."""
    connection = redis.Redis.from_url(own_redis.url)
    settings = worker_settings(own_redis.url, model=model, prefetch_jobs=2, lost_after=10.0,
                               heartbeat_interval=0.5, redis_retry_max_wait=1.0)
    pair = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(2)]
    procs.extend(pair)
    wait_for(lambda: SimpleWorker.count(connection=connection) == 2, timeout=60, what="two workers to register")
    jobs = [enqueue(connection, requests["long"](300), job_id=f"long-{i}") for i in range(2)]
    jobs += [enqueue(connection, requests["short"](n), job_id=f"short-{n}") for n in range(10)]
    wait_for(lambda: len(started_ids(connection)) >= 3, what="jobs in the workers' hands")
    restart(own_redis)
    wait_for(lambda: all(fetch(connection, job.id).get_status() == "finished" for job in jobs), timeout=120,
             what="every job to finish")
    assert all(proc.poll() is None for proc in pair)  # both rode it out
    for job in jobs:
        job = fetch(connection, job.id)
        assert len(job.results()) == 1 and job.get_meta()[record.META_ATTEMPT] == 1  # run once, recorded once
        assert record.META_LOST not in job.get_meta()
    for proc in pair:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=30) for proc in pair] == [0, 0]
    assert "Traceback" not in "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))


def test_an_idle_worker_takes_jobs_within_seconds_of_redis_coming_back(own_redis, model, requests, tmp_path, procs,
                                                                     report):
    """RQ alone doubles its wait up to 60 s; audioq's stops at redis_retry_max_wait."""
    connection = redis.Redis.from_url(own_redis.url)
    settings = worker_settings(own_redis.url, model=model, redis_retry_max_wait=1.0)
    procs.append(worker := start_worker(settings, tmp_path / "worker.log"))
    wait_for(lambda: SimpleWorker.count(connection=connection) == 1, timeout=60, what="the worker to register")
    back_at = restart(own_redis, down_for=8.0)  # long enough for RQ's own waits to have grown to 8 s
    job = enqueue(connection, requests["short"](0))
    wait_for(lambda: fetch(connection, job.id).get_status() != "queued", timeout=20, what="the job to be taken")
    taken_after = time.monotonic() - back_at
    assert worker.poll() is None and taken_after < settings.redis_retry_max_wait + 2
    report(f"redis restart: an idle worker took a job {taken_after:.2f} s after Redis answered again "
           f"(down 8 s; redis_retry_max_wait {settings.redis_retry_max_wait:g} s)")


def test_while_redis_is_away_the_engine_keeps_decoding_and_only_the_records_wait(own_redis, model, requests,
                                                                                tmp_path, procs, report):
    """Redis stops just as a long job starts generating beside shorter ones that end during the outage:
    their outcomes wait for Redis on the records thread, but the long job's decoding does not wait for
    them, and every job ends finished, recorded once."""
    connection = redis.Redis.from_url(own_redis.url)
    settings = worker_settings(own_redis.url, model=model, prefetch_jobs=3, lost_after=30.0,
                               heartbeat_interval=0.5, redis_retry_max_wait=0.5)
    procs.append(worker := start_worker(settings, tmp_path / "worker.log"))
    wait_for(lambda: SimpleWorker.count(connection=connection) == 1, timeout=60, what="the worker to register")
    pace = enqueue(connection, requests["long"](150))  # alone, with Redis up: this machine's decoding pace
    wait_for(lambda: fetch(connection, pace.id).get_status() == "finished", timeout=60, what="the pace job")
    decoding = fetch(connection, pace.id).return_value()["timings"]["generate"] * LONG_RUN / 150
    long = enqueue(connection, requests["long"]())
    beside = [enqueue(connection, requests["long"](150), job_id=f"beside-{n}") for n in range(3)]
    wait_for(lambda: (fetch(connection, long.id).get_meta().get(record.META_PROGRESS) or {}).get("stage")
             == "generate", timeout=60, what="the long job to generate")
    # the long job decodes for ~decoding s; a loop that waited at a finish would stand still for the outage
    down_for = max(12.0, 3 * decoding)
    restart(own_redis, down_for=down_for)
    wait_for(lambda: all(fetch(connection, j.id).get_status() == "finished" for j in [long, *beside]), timeout=60,
             what="every job to finish")
    generating = fetch(connection, long.id).return_value()["timings"]["generate"]
    assert generating < down_for - 2  # it did not stand still until Redis came back
    for job in [long, *beside]:
        assert len(fetch(connection, job.id).results()) == 1
    assert worker.poll() is None
    report(f"redis away {down_for:.1f} s: a job decoding through it generated {LONG_RUN} tokens in {generating:.1f} s "
           f"({decoding:.1f} s at the pace of one job alone)")
