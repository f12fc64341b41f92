"""A worker's name: a crashed worker's is free again at once, a live one's is refused, info tells them apart.

Workers are real subprocesses (``run_worker`` on the tiny checkpoint) started with a fixed
``--name``, as launchd starts one per Mac, and SIGKILLed as a crash would end them. RQ alone
refuses the name of a SIGKILLed worker for ``worker_ttl + 60`` s (8 minutes) and lists it
as alive all that time.
"""

from __future__ import annotations

import signal
import socket

from test_worker_liveness import (LOST_AFTER, SHORT_RUN, liveness_settings, long_request, model,  # noqa: F401
                                  procs, stage_of)
from worker_fixtures import enqueue, fetch, start_worker, wait_for

from producer import record
from producer.client import Client
from worker.process import AudioWorker

NAME = "mac-studio-1"
BEAT_LAPSE = 20.0  # lost_after where a worker must start up (load the model) while another's beat lasts


def registered_pid(redis_conn, name: str = NAME) -> int | None:
    pid = redis_conn.hget(f"rq:worker:{name}", "pid")
    return int(pid) if pid else None


def worker_states(client: Client) -> dict[str, str]:
    return {w.name: w.state for w in client.info().workers}


def start_named(settings, tmp_path, procs, log: str, **options):
    proc = start_worker(settings, tmp_path / log, name=NAME, **options)
    procs.append(proc)
    return proc


def test_a_crashed_workers_name_is_taken_back_at_once_by_its_restart(redis_url, redis_conn, model, long_request,
                                                                     tmp_path, procs):
    settings = liveness_settings(redis_url, model=model, lost_after=30.0)  # the beat alone would take 30 s
    crashed = start_named(settings, tmp_path, procs, "first.log")
    wait_for(lambda: registered_pid(redis_conn) == crashed.pid, what="the first worker to register")
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    restarted = start_named(settings, tmp_path, procs, "second.log", max_jobs=1)
    wait_for(lambda: registered_pid(redis_conn) == restarted.pid, timeout=30, what="the restart to register")
    job = enqueue(redis_conn, long_request(SHORT_RUN))
    assert restarted.wait(timeout=60) == 0
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and job.worker_name == NAME
    assert "taken back from a gone worker" in (tmp_path / "second.log").read_text()


def test_a_second_worker_with_a_live_workers_name_stops_with_a_sentence(redis_url, redis_conn, model, tmp_path,
                                                                        procs):
    settings = liveness_settings(redis_url, model=model)
    live = start_named(settings, tmp_path, procs, "live.log")
    wait_for(lambda: registered_pid(redis_conn) == live.pid, what="the first worker to register")
    twin = start_named(settings, tmp_path, procs, "twin.log")
    assert twin.wait(timeout=60) == 3
    assert f"worker name {NAME!r} is in use by a live worker (pid {live.pid}" in (tmp_path / "twin.log").read_text()
    assert live.poll() is None and registered_pid(redis_conn) == live.pid
    live.send_signal(signal.SIGTERM)
    assert live.wait(timeout=20) == 0


def test_a_name_left_on_another_host_is_free_once_its_beat_lapses(redis_url, redis_conn, engine, model, tmp_path,
                                                                  procs):
    """No pid to check across Macs: the worker beat decides, so the name is free after lost_after."""
    settings = liveness_settings(redis_url, model=model, lost_after=BEAT_LAPSE)
    elsewhere = AudioWorker(settings.queues, settings=settings, engine=engine, connection=redis_conn, name=NAME)
    elsewhere.hostname = f"not-{socket.gethostname()}"
    elsewhere.register_birth()  # beats once, then never again: a Mac that lost power
    early = start_named(settings, tmp_path, procs, "early.log")
    assert early.wait(timeout=60) == 3  # refused while that beat lasts
    assert redis_conn.exists(record.worker_beat_key(NAME)), "the early worker started after the beat lapsed"
    wait_for(lambda: not redis_conn.exists(record.worker_beat_key(NAME)), timeout=BEAT_LAPSE + 1,
             what="the other host's beat to lapse")
    late = start_named(settings, tmp_path, procs, "late.log", burst=True)
    assert late.wait(timeout=60) == 0
    assert "its heartbeat has lapsed" in (tmp_path / "late.log").read_text()


def test_info_shows_a_sigkilled_worker_as_lost_not_busy(redis_url, redis_conn, model, long_request, tmp_path,
                                                        procs):
    settings = liveness_settings(redis_url, model=model, lost_job_retries=0)
    worker = start_named(settings, tmp_path, procs, "worker.log")
    client = Client(settings, connection=redis_conn)
    job = enqueue(redis_conn, long_request(2048))
    wait_for(lambda: stage_of(job) == "generate", what="the job to be generating")
    assert worker_states(client) == {NAME: "busy"}
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    wait_for(lambda: worker_states(client) == {NAME: "lost"}, timeout=LOST_AFTER + 1,
             what="info to show the dead worker as lost")
