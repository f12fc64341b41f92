"""Worker processes that die or are stopped: lost jobs are resolved, warm shutdown finishes the job.

Workers run as real subprocesses (``run_worker`` with a ScriptedEngine whose decode steps
take real time), and are SIGKILLed or SIGTERMed mid-job. Liveness times are scaled down
(heartbeat 0.2 s, lost after 1 s); with the defaults (15 s, 60 s) the same mechanism
resolves a lost job within lost_after + heartbeat_interval = 75 s.
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import make_tone
from rq import SimpleWorker
from worker_fixtures import enqueue, fetch, start_worker, wait_for, worker_settings, write_wav

from producer import record

LONG_JOB = dict(steps=2048, step_seconds=0.02)  # 40 s unless killed


@pytest.fixture
def request_dict(tmp_path):
    return {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri(), "max_new_tokens": 2048}


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stage_of(job) -> str | None:
    return (job.get_meta(refresh=True).get(record.META_PROGRESS) or {}).get("stage")


def workers(redis_conn) -> int:
    return SimpleWorker.count(connection=redis_conn)


def kill_mid_job(redis_conn, settings, job, tmp_path, procs, **survivor):
    """Start a worker on ``job``, then an idle survivor, then SIGKILL the first; returns (kill time, survivor)."""
    doomed = start_worker(settings, tmp_path / "doomed.log", **LONG_JOB)
    procs.append(doomed)
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    other = start_worker(settings, tmp_path / "survivor.log", **survivor)
    procs.append(other)
    wait_for(lambda: workers(redis_conn) == 2, what="the survivor to register")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    return time.monotonic(), other


def test_a_sigkilled_workers_job_is_requeued_and_finished_by_another_worker(redis_url, redis_conn, request_dict,
                                                                            tmp_path, procs, report):
    settings = worker_settings(redis_url, lost_job_retries=1)
    job = enqueue(redis_conn, request_dict)
    killed_at, survivor = kill_mid_job(redis_conn, settings, job, tmp_path, procs, max_jobs=1)
    assert fetch(redis_conn, job.id).get_status() == "started"  # what RQ alone would show for 10+ minutes
    wait_for(lambda: job.get_meta(refresh=True).get(record.META_LOST), what="the reaper to requeue the job")
    requeued_after = time.monotonic() - killed_at
    assert survivor.wait(timeout=20) == 0
    job = fetch(redis_conn, job.id)
    meta = job.get_meta()
    assert job.get_status() == "finished"
    assert meta[record.META_LOST] == 1 and meta[record.META_ATTEMPT] == 2
    retry = meta[record.META_RETRY]
    assert retry["code"] == "worker_lost" and "at stage generate" in retry["message"]
    assert requeued_after < settings.lost_after + 3 * settings.heartbeat_interval + 0.5
    report(f"worker_lost: SIGKILLed worker's job requeued {requeued_after:.2f} s after the kill "
           f"(lost_after {settings.lost_after:g} s, heartbeat {settings.heartbeat_interval:g} s)")


def test_a_job_lost_more_often_than_allowed_fails_as_worker_lost(redis_url, redis_conn, request_dict, tmp_path,
                                                                 procs, report):
    settings = worker_settings(redis_url, lost_job_retries=0)
    job = enqueue(redis_conn, request_dict)
    killed_at, idle = kill_mid_job(redis_conn, settings, job, tmp_path, procs)
    wait_for(lambda: fetch(redis_conn, job.id).get_status() == "failed", what="the lost job to fail")
    failed_after = time.monotonic() - killed_at
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert failure["code"] == "worker_lost" and failure["retryable"] and "lost 1 times" in failure["message"]
    assert job.latest_result().exc_string == f"worker_lost: {failure['message']}"
    assert job.id in job.failed_job_registry and job.id not in job.started_job_registry
    assert failed_after < settings.lost_after + 3 * settings.heartbeat_interval + 0.5
    report(f"worker_lost: job of a SIGKILLed worker failed {failed_after:.2f} s after the kill by an idle worker "
           f"(lost_after {settings.lost_after:g} s, heartbeat {settings.heartbeat_interval:g} s)")
    idle.send_signal(signal.SIGTERM)
    assert idle.wait(timeout=10) == 0


def test_a_running_job_keeps_beating_and_is_never_reaped(redis_url, redis_conn, request_dict, tmp_path, procs):
    settings = worker_settings(redis_url)
    job = enqueue(redis_conn, request_dict)
    busy = start_worker(settings, tmp_path / "busy.log", steps=700, step_seconds=0.01, max_jobs=1)
    procs.append(busy)
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    sweeper = start_worker(settings, tmp_path / "sweeper.log")
    procs.append(sweeper)
    wait_for(lambda: workers(redis_conn) == 2, what="the sweeping worker to register")
    assert 0 < redis_conn.pttl(record.beat_key(job.id)) <= settings.lost_after * 1000
    time.sleep(3 * settings.lost_after)
    assert fetch(redis_conn, job.id).get_status() == "started"
    assert busy.wait(timeout=30) == 0
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and record.META_LOST not in job.get_meta()
    assert not redis_conn.exists(record.beat_key(job.id))
    sweeper.send_signal(signal.SIGTERM)
    assert sweeper.wait(timeout=10) == 0


def test_sigterm_mid_job_finishes_the_job_then_exits_0(redis_url, redis_conn, request_dict, tmp_path, procs):
    settings = worker_settings(redis_url)
    first = enqueue(redis_conn, request_dict)
    second = enqueue(redis_conn, request_dict)
    worker = start_worker(settings, tmp_path / "worker.log", steps=150, step_seconds=0.01)
    procs.append(worker)
    wait_for(lambda: stage_of(first) == "generate", what="the first job to be generating")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert fetch(redis_conn, first.id).get_status() == "finished"
    assert fetch(redis_conn, second.id).get_status() == "queued"
