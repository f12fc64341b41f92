"""Worker processes that die or are stopped: lost jobs are resolved, warm shutdown finishes the job.

Workers run as real subprocesses (``run_worker`` loading the tiny random-weight e2b
checkpoint) and are SIGKILLed or SIGTERMed while the real engine is generating. Jobs run on
``long_tone``, on which the checkpoint generates its whole ``max_new_tokens`` (see
worker_fixtures), so the budget sets how long a job keeps generating; tests that let a job
finish assert it generated the full budget. When a test needs two workers, both start
before the job is enqueued, and the one that takes it is signalled as soon as the job is
generating, so the budget need not cover a second worker's start-up.

Liveness times are scaled down (heartbeat 0.2 s, lost after 2 s); with the defaults (15 s,
60 s) the same mechanism resolves a lost job within lost_after + heartbeat_interval = 75 s.
Time bounds derive from the settings, with a second of slack for two busy cores.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest
import redis
from conftest import make_tone
from rq import Queue, SimpleWorker
from rq.registry import ScheduledJobRegistry
from worker_fixtures import (closed_endpoint, enqueue, fetch, long_tone, procs, redis_proxy,  # noqa: F401
                             start_worker, strand, wait_for, worker_settings, write_wav)

from producer import record
from worker import reaper
from worker.process import TICK, AudioWorker

# Tokens, at ~5-7 ms each here: long enough to signal the job mid-generation, short enough to
# run to the end when the test needs the job finished.
SHORT_RUN = 300  # ~2 s
BEATING_RUN = 1600  # ~8-11 s, for a job that must outlive 3 x lost_after
KILLED_RUN = 2048  # ~13 s; never run to the end
LOST_AFTER = 2.0
SLACK = 1.0  # seconds a busy machine may add to a bound


def liveness_settings(redis_url, **overrides):
    return worker_settings(redis_url, **{"lost_after": LOST_AFTER, **overrides})


def resolve_bounds(settings) -> tuple[float, float]:
    """When, after a worker's death, its job is resolved: once its beat (refreshed every
    heartbeat_interval, set to expire after lost_after) has expired, at the next sweep, which
    comes within a heartbeat_interval (the reaper lock never makes a sweeper skip one)."""
    return settings.lost_after - settings.heartbeat_interval - SLACK / 2, \
        settings.lost_after + settings.heartbeat_interval + SLACK


@pytest.fixture
def model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint())


@pytest.fixture
def long_request(tmp_path):
    uri = long_tone(tmp_path / "long.wav").as_uri()
    return lambda max_new_tokens: {"audio_uri": uri, "max_new_tokens": max_new_tokens}


def stage_of(job) -> str | None:
    return (job.get_meta(refresh=True).get(record.META_PROGRESS) or {}).get("stage")


def workers(redis_conn) -> int:
    return SimpleWorker.count(connection=redis_conn)


def start_idle_workers(redis_conn, settings, tmp_path, procs, count: int, **options) -> list[subprocess.Popen]:
    started = [start_worker(settings, tmp_path / f"worker{i}.log", **options) for i in range(count)]
    procs.extend(started)
    # A worker registers after loading the model and its warm-up: seconds on a busy machine.
    wait_for(lambda: workers(redis_conn) == count, timeout=60, what=f"{count} workers to register")
    return started


def split_by_job(redis_conn, job, pair: list[subprocess.Popen]) -> tuple[subprocess.Popen, subprocess.Popen]:
    """(the worker running ``job``, the other one); worker names end in the process id."""
    pid = int(fetch(redis_conn, job.id).worker_name.rsplit("-", 1)[1])
    (busy,) = [p for p in pair if p.pid == pid]
    (other,) = [p for p in pair if p.pid != pid]
    return busy, other


def kill_mid_job(redis_conn, settings, request, tmp_path, procs, **options):
    """Two idle workers, then ``request``; the worker that takes it is SIGKILLed while generating.

    Returns (job, kill time, survivor).
    """
    pair = start_idle_workers(redis_conn, settings, tmp_path, procs, 2, **options)
    job = enqueue(redis_conn, request)
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    doomed, survivor = split_by_job(redis_conn, job, pair)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()
    # Killed mid-job, not after it: what RQ alone would show for 10+ minutes.
    assert fetch(redis_conn, job.id).get_status() == "started"
    return job, killed_at, survivor


def test_a_sigkilled_workers_job_is_requeued_and_finished_by_another_worker(redis_url, redis_conn, model,
                                                                            long_request, tmp_path, procs, report):
    settings = liveness_settings(redis_url, model=model, lost_job_retries=1)
    job, killed_at, survivor = kill_mid_job(redis_conn, settings, long_request(SHORT_RUN), tmp_path, procs,
                                            max_jobs=1)
    doomed_name = fetch(redis_conn, job.id).worker_name
    wait_for(lambda: job.get_meta(refresh=True).get(record.META_LOST), what="the reaper to requeue the job")
    requeued_after = time.monotonic() - killed_at
    assert survivor.wait(timeout=60) == 0
    job = fetch(redis_conn, job.id)
    meta = job.get_meta()
    assert job.get_status() == "finished"
    result = job.return_value()
    assert result["tokens"] == SHORT_RUN and result["worker"] == job.worker_name != doomed_name
    assert meta[record.META_LOST] == 1 and meta[record.META_ATTEMPT] == 2
    retry = meta[record.META_RETRY]
    assert retry["code"] == "worker_lost" and "at stage generate" in retry["message"]
    earliest, latest = resolve_bounds(settings)
    assert earliest < requeued_after < latest
    report(f"worker_lost: SIGKILLed worker's job requeued {requeued_after:.2f} s after the kill "
           f"(lost_after {settings.lost_after:g} s, heartbeat {settings.heartbeat_interval:g} s)")


def test_a_job_lost_more_often_than_allowed_fails_as_worker_lost(redis_url, redis_conn, model, long_request,
                                                                 tmp_path, procs, report):
    settings = liveness_settings(redis_url, model=model, lost_job_retries=0)
    job, killed_at, idle = kill_mid_job(redis_conn, settings, long_request(KILLED_RUN), tmp_path, procs)
    wait_for(lambda: fetch(redis_conn, job.id).get_status() == "failed", what="the lost job to fail")
    failed_after = time.monotonic() - killed_at
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert failure["code"] == "worker_lost" and failure["retryable"] and "lost 1 times" in failure["message"]
    assert job.latest_result().exc_string == f"worker_lost: {failure['message']}"
    assert job.id in job.failed_job_registry and job.id not in job.started_job_registry
    earliest, latest = resolve_bounds(settings)
    assert earliest < failed_after < latest
    report(f"worker_lost: job of a SIGKILLed worker failed {failed_after:.2f} s after the kill by an idle worker "
           f"(lost_after {settings.lost_after:g} s, heartbeat {settings.heartbeat_interval:g} s)")
    idle.send_signal(signal.SIGTERM)
    assert idle.wait(timeout=10) == 0


def test_a_running_job_keeps_beating_and_is_never_reaped(redis_url, redis_conn, model, long_request, tmp_path,
                                                         procs):
    settings = liveness_settings(redis_url, model=model)
    pair = start_idle_workers(redis_conn, settings, tmp_path, procs, 2, max_jobs=1)
    job = enqueue(redis_conn, long_request(BEATING_RUN))
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    busy, sweeper = split_by_job(redis_conn, job, pair)
    assert 0 < redis_conn.pttl(record.beat_key(job.id)) <= settings.lost_after * 1000
    time.sleep(3 * settings.lost_after)  # three times over, the idle worker's sweeps would reap a beatless job
    # Still generating: the window really covered a running job.
    assert fetch(redis_conn, job.id).get_status() == "started" and stage_of(job) == "generate"
    assert busy.wait(timeout=60) == 0
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and record.META_LOST not in job.get_meta()
    assert job.return_value()["tokens"] == BEATING_RUN and job.get_meta()[record.META_ATTEMPT] == 1
    assert not redis_conn.exists(record.beat_key(job.id))
    sweeper.send_signal(signal.SIGTERM)
    assert sweeper.wait(timeout=10) == 0


def test_sigterm_mid_job_finishes_the_job_then_exits_0(redis_url, redis_conn, model, long_request, tmp_path, procs):
    settings = liveness_settings(redis_url, model=model, batch_max_jobs=1)
    (worker,) = start_idle_workers(redis_conn, settings, tmp_path, procs, 1)
    first = enqueue(redis_conn, long_request(SHORT_RUN))
    wait_for(lambda: stage_of(first) == "generate", what="the first job to be generating")
    # Enqueued once the first holds the engine's one slot, "second" cannot start before it
    # (enqueued together, it could be prepared first and run first).
    second = enqueue(redis_conn, long_request(SHORT_RUN), job_id="second")
    signalled_at = datetime.now(timezone.utc)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    first = fetch(redis_conn, first.id)
    assert first.get_status() == "finished" and first.ended_at > signalled_at  # it was mid-job when signalled
    assert first.return_value()["tokens"] == SHORT_RUN  # and then generated its whole budget
    assert fetch(redis_conn, second.id).get_status() == "queued"


# ------------------------------------------------------------------ cold shutdown
@pytest.mark.parametrize("lost_job_retries", [1, 0])
def test_a_cold_shutdown_mid_job_resolves_the_job_as_a_sigkill_would(redis_url, redis_conn, model, long_request,
                                                                      tmp_path, procs, lost_job_retries):
    """Second SIGTERM: the same outcome as a SIGKILL (requeued at the front while lost_job_retries
    allows, else failed as worker_lost), but at once rather than after lost_after."""
    settings = liveness_settings(redis_url, model=model, lost_job_retries=lost_job_retries,
                                 batch_max_jobs=1)
    (worker,) = start_idle_workers(redis_conn, settings, tmp_path, procs, 1)
    job = enqueue(redis_conn, long_request(KILLED_RUN))
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    # Enqueued once the job holds the engine's one slot, "behind" never starts: claimed ahead
    # (or still queued), it must end up back on the queue, unrun. Enqueued together, it could
    # be prepared first and run first, and a started job is resolved as lost like the other.
    behind = enqueue(redis_conn, long_request(SHORT_RUN), job_id="behind")
    worker.send_signal(signal.SIGTERM)  # warm: the job goes on
    time.sleep(1.2)  # RQ ignores a second signal within a second of the first
    assert stage_of(job) == "generate"
    worker.send_signal(signal.SIGTERM)  # cold
    assert worker.wait(timeout=20) == 0
    job = fetch(redis_conn, job.id)
    meta = job.get_meta()
    assert meta[record.META_LOST] == 1 and meta[record.META_ATTEMPT] == 1
    assert not redis_conn.exists(record.beat_key(job.id)) and job.id not in job.started_job_registry
    if lost_job_retries:
        retry = meta[record.META_RETRY]
        assert retry["code"] == "worker_lost" and "cold shutdown" in retry["message"]
        assert "at stage generate" in retry["message"] and "requeued (1 of 1 allowed)" in retry["message"]
        assert job.get_status() == "queued" and record.META_FAILURE not in meta
        assert Queue("default", connection=redis_conn).get_job_ids() == [job.id, behind.id]  # at the front
    else:
        failure = meta[record.META_FAILURE]
        assert failure["code"] == "worker_lost" and "cold shutdown" in failure["message"]
        assert job.get_status() == "failed" and job.id in job.failed_job_registry
        assert job.latest_result().exc_string == f"worker_lost: {failure['message']}"
        assert Queue("default", connection=redis_conn).get_job_ids() == [behind.id]


# ------------------------------------------------------------------ the reaper
def test_workers_on_disjoint_queues_each_resolve_the_lost_jobs_of_theirs(redis_url, redis_conn, engine, tmp_path):
    """One reaper lock per queue: with one lock for all, a worker on queue b could find it taken by
    the worker on queue a at every sweep, and b's lost jobs would stay "started" for good."""
    request = {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()}
    on = {q: liveness_settings(redis_url, queues=[q], default_queue=q, lost_job_retries=0) for q in "ab"}
    lost = {q: strand(redis_conn, enqueue(redis_conn, request, settings=on[q], job_id=f"lost-{q}"), on[q])
            for q in "ab"}
    # Two sweeps at the same moment, one per queue: neither may keep the other from its queue.
    assert reaper.sweep(redis_conn, ["a"], on["a"], "worker-a") == {"lost-a": "failed"}
    assert reaper.sweep(redis_conn, ["b"], on["b"], "worker-b") == {"lost-b": "failed"}

    # And through two real workers' maintenance threads, each on its own queue.
    lost = {q: strand(redis_conn, enqueue(redis_conn, request, settings=on[q], job_id=f"again-{q}"), on[q])
            for q in "ab"}
    workers = [AudioWorker([q], settings=on[q], engine=engine, connection=redis_conn) for q in "ab"]
    for worker in workers:
        worker.maintenance.start()
    try:
        for job_id in (job.id for job in lost.values()):
            wait_for(lambda job_id=job_id: fetch(redis_conn, job_id).get_status() == "failed", timeout=10,
                     what=f"lost job {job_id} to be resolved")
            assert fetch(redis_conn, job_id).get_meta()[record.META_FAILURE]["code"] == "worker_lost"
    finally:
        for worker in workers:
            worker.maintenance.stop()


def test_a_job_stuck_past_the_hard_time_limit_stops_beating_and_is_treated_as_lost(redis_url, redis_conn, engine,
                                                                                   tmp_path, caplog):
    """A native call that never returns keeps the main thread (and RQ's SIGALRM) from ending the
    job; the maintenance thread beats on, so without a cut-off the job would read "started" forever."""
    settings = liveness_settings(redis_url, test_hard_timeout=2, lost_job_retries=1)
    job = enqueue(redis_conn, {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()},
                  settings=settings)
    worker = AudioWorker(settings.queues, settings=settings, engine=engine, connection=redis_conn)
    strand(redis_conn, job, settings, worker)  # the main thread's part, then it never comes back
    started = time.monotonic()
    worker.maintenance.start()
    try:
        time.sleep(settings.hard_timeout - 0.5)
        # Within the limit the worker beats, though its own sweeps look at the job all along.
        assert fetch(redis_conn, job.id).get_status() == "started" and redis_conn.exists(record.beat_key(job.id))
        wait_for(lambda: job.get_meta(refresh=True).get(record.META_LOST), timeout=15,
                 what="the stuck job to be requeued")
        requeued_after = time.monotonic() - started
    finally:
        worker.maintenance.stop()
    assert settings.hard_timeout < requeued_after < settings.hard_timeout + resolve_bounds(settings)[1]
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "queued"
    assert "past the hard time limit of 2 s" in job.get_meta()[record.META_RETRY]["message"]
    assert any("the main thread is stuck" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_the_maintenance_thread_outlives_redis_being_away_when_it_starts(redis_url, redis_conn, engine,
                                                                         redis_proxy):  # noqa: F811
    """If the thread died on its first Redis call, every job this worker ran would look lost."""
    settings = liveness_settings(redis_proxy.url())
    worker = AudioWorker(settings.queues, settings=settings, engine=engine,
                         connection=redis.Redis.from_url(settings.redis_url))
    redis_proxy.refusing = True
    worker.maintenance.start()
    try:
        time.sleep(1.0)  # several rounds, the first one included, find no Redis
        assert worker.maintenance.is_alive()
        redis_proxy.refusing = False
        wait_for(lambda: redis_conn.exists(record.worker_beat_key(worker.name)), timeout=10,
                 what="the worker to beat once Redis answers")
        worker.maintenance.job_started("some-job")  # beats once, from this thread
        time.sleep(settings.lost_after + 2 * settings.heartbeat_interval)  # that beat alone would have expired
        assert 0 < redis_conn.pttl(record.beat_key("some-job")) <= settings.lost_after * 1000
    finally:
        worker.maintenance.stop()


def test_a_sweepers_own_lock_never_keeps_it_from_its_next_sweep(redis_url, redis_conn, tmp_path):
    """The lock lives one heartbeat_interval; a sweep that comes a moment before it lapses is the
    holder's, not skipped (which made a lost job wait two beats instead of one)."""
    settings = liveness_settings(redis_url, lost_job_retries=0)
    assert reaper.sweep(redis_conn, ["default"], settings, "sweeper") == {}
    request = {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()}
    job = strand(redis_conn, enqueue(redis_conn, request), settings)
    assert redis_conn.get(reaper.lock_key("default")) == b"sweeper"  # still held from the first sweep
    assert reaper.sweep(redis_conn, ["default"], settings, "sweeper") == {job.id: "failed"}


def test_another_workers_sweep_waits_for_a_held_lock(redis_url, redis_conn, tmp_path):
    settings = liveness_settings(redis_url, lost_job_retries=0)
    assert reaper.sweep(redis_conn, ["default"], settings, "holder") == {}
    request = {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()}
    job = strand(redis_conn, enqueue(redis_conn, request), settings)
    assert reaper.sweep(redis_conn, ["default"], settings, "other") == {}
    time.sleep(settings.heartbeat_interval)
    assert reaper.sweep(redis_conn, ["default"], settings, "other") == {job.id: "failed"}


def test_killing_the_reaper_lock_holder_delays_its_jobs_recovery_by_no_more_than_a_beat(
        redis_url, redis_conn, model, long_request, tmp_path, procs, report):
    """The first worker holds the lock (renewing it) and runs the job; the second starts later."""
    settings = liveness_settings(redis_url, model=model, heartbeat_interval=0.5, lost_job_retries=0)
    (holder,) = start_idle_workers(redis_conn, settings, tmp_path, procs, 1)
    job = enqueue(redis_conn, long_request(KILLED_RUN))
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    procs.append(start_worker(settings, tmp_path / "second.log"))
    wait_for(lambda: workers(redis_conn) == 2, what="the second worker to register")
    holder_name = fetch(redis_conn, job.id).worker_name.encode()
    # The lock lapses for a moment between two of its holder's sweeps; look until it is there.
    wait_for(lambda: redis_conn.get(reaper.lock_key("default")) == holder_name, timeout=5,
             interval=0.01, what="the job's worker to hold the reaper lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.monotonic()
    wait_for(lambda: fetch(redis_conn, job.id).get_status() == "failed", timeout=15, what="the lost job to fail")
    failed_after = time.monotonic() - killed_at
    assert failed_after < settings.lost_after + settings.heartbeat_interval + SLACK
    report(f"worker_lost: the reaper-lock holder's job failed {failed_after:.2f} s after its SIGKILL "
           f"(lost_after {settings.lost_after:g} s, heartbeat {settings.heartbeat_interval:g} s)")


def test_killing_a_worker_delays_no_due_retry(redis_url, redis_conn, model, tmp_path, procs, monkeypatch, report):
    """Due retries are moved by every worker, lock-free: with RQ's scheduler, the first worker held
    its locks and a retry waited minutes for the survivor to take them over."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # signed requests, refused at the closed port
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    backoff = 3.0
    settings = liveness_settings(redis_url, model=model, s3_endpoint_url=closed_endpoint(), storage_retries=1,
                                 storage_retry_backoff=[backoff])
    (first,) = start_idle_workers(redis_conn, settings, tmp_path, procs, 1)
    procs.append(start_worker(settings, tmp_path / "second.log"))
    wait_for(lambda: workers(redis_conn) == 2, what="the second worker to register")
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    scheduled = ScheduledJobRegistry("default", connection=redis_conn)
    due = wait_for(lambda: scheduled.get_scheduled_time(job.id) if job.id in scheduled else None,
                   what="the first attempt to schedule its retry")
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: job.id not in scheduled, timeout=backoff + 10, what="the retry to leave the schedule")
    late = (datetime.now(timezone.utc) - due).total_seconds()
    assert late < TICK + SLACK
    wait_for(lambda: fetch(redis_conn, job.id).get_status() == "failed", what="the second attempt to fail")
    meta = fetch(redis_conn, job.id).get_meta()
    assert meta[record.META_ATTEMPT] == 2 and meta[record.META_FAILURE]["code"] == "storage_unavailable"
    report(f"storage retry: back on its queue {late:.2f} s after it came due, its first worker SIGKILLed")
