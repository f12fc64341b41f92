"""Jobs written to Redis by other means than the producer: refused, never imported or run.

Each test writes a real crafted job to Redis, runs a real burst worker, and checks both the
recorded failure and that the side effect the job asked for did not happen.
"""

from __future__ import annotations

import pickle

import pytest
from conftest import make_tone
from rq import Queue
from rq.job import Callback, Job
from rq.serializers import JSONSerializer
from worker_fixtures import (MARK_ENV, PickleBomb, enqueue, failure_code, fetch, run_burst, worker_settings,
                             write_wav)

from producer import record


@pytest.fixture
def mark(tmp_path, monkeypatch):
    path = tmp_path / "mark"
    monkeypatch.setenv(MARK_ENV, str(path))
    return path


@pytest.fixture
def good_request(tmp_path):
    return {"audio_uri": write_wav(tmp_path / "ok.wav", make_tone(1.0)).as_uri()}


def json_queue(redis_conn, name="default") -> Queue:
    return Queue(name, connection=redis_conn, serializer=JSONSerializer)


def test_a_job_naming_os_system_is_failed_not_run(redis_url, redis_conn, engine, mark, good_request):
    crafted = json_queue(redis_conn).enqueue("os.system", f"touch {mark}")
    good = enqueue(redis_conn, good_request)
    run_burst(worker_settings(redis_url), engine)
    crafted = fetch(redis_conn, crafted.id)
    assert not mark.exists()
    assert crafted.get_status() == "failed" and failure_code(crafted) == "invalid_request"
    assert "'os.system' is not allowed" in crafted.get_meta()[record.META_FAILURE]["message"]
    assert fetch(redis_conn, good.id).get_status() == "finished"  # the worker kept going


@pytest.mark.parametrize("hook", ["on_success", "on_failure", "on_stopped"])
def test_a_job_carrying_callback_names_is_refused_and_the_callback_never_runs(redis_url, redis_conn, engine,
                                                                              mark, good_request, hook):
    crafted = json_queue(redis_conn).enqueue(record.TASK_FUNC, good_request,
                                             **{hook: Callback("worker_fixtures.leave_mark")})
    run_burst(worker_settings(redis_url), engine)
    crafted = fetch(redis_conn, crafted.id)
    assert not mark.exists()
    assert failure_code(crafted) == "invalid_request"
    assert "carry no callbacks" in crafted.get_meta()[record.META_FAILURE]["message"]


def test_a_pickled_job_is_refused_without_unpickling_it(redis_url, redis_conn, engine, mark, good_request):
    crafted = Job.create(print, args=[PickleBomb(mark)], connection=redis_conn, serializer=pickle,
                         origin="default")
    crafted.save()
    Queue("default", connection=redis_conn).push_job_id(crafted.id)
    good = enqueue(redis_conn, good_request)
    run_burst(worker_settings(redis_url), engine)
    assert not mark.exists()
    crafted = fetch(redis_conn, crafted.id)
    assert crafted.get_status() == "failed" and failure_code(crafted) == "invalid_request"
    assert fetch(redis_conn, good.id).get_status() == "finished"


def test_a_job_with_extra_arguments_is_refused(redis_url, redis_conn, engine, good_request):
    crafted = json_queue(redis_conn).enqueue(record.TASK_FUNC, good_request, "second argument")
    run_burst(worker_settings(redis_url), engine)
    assert failure_code(fetch(redis_conn, crafted.id)) == "invalid_request"


@pytest.mark.parametrize("request_dict,says", [
    ({"audio_uri": "http://example.com/a.wav"}, "scheme must be one of"),
    ({"audio_uri": "s3://audio/a.wav", "shell": "rm -rf /"}, "shell: Extra inputs are not permitted"),
    ({"audio_uri": "s3://audio/a.wav", "task": "translate"}, "needs target_language"),
    ({"audio_uri": "s3://audio/a.wav", "max_new_tokens": 0}, "max_new_tokens"),
])
def test_a_bad_request_dict_written_past_the_producer_is_invalid_request(redis_url, redis_conn, engine,
                                                                        request_dict, says):
    job = enqueue(redis_conn, request_dict)
    run_burst(worker_settings(redis_url), engine)
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "invalid_request"
    assert says in failure["message"]
    assert job.latest_result().exc_string == f"invalid_request: {failure['message']}"


def test_a_job_record_rq_cannot_parse_is_failed_and_the_worker_goes_on(redis_url, redis_conn, engine, good_request):
    """Without this, RQ's worker quits on the first malformed hash ("unhandled exception")."""
    crafted = json_queue(redis_conn).enqueue(record.TASK_FUNC, good_request)
    redis_conn.hset(crafted.key, "status", "no-such-status")
    good = enqueue(redis_conn, good_request)
    run_burst(worker_settings(redis_url), engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"
    crafted = fetch(redis_conn, crafted.id)
    assert crafted.get_status() == "failed" and failure_code(crafted) == "invalid_request"
    assert "'no-such-status' is not a valid JobStatus" in crafted.get_meta()[record.META_FAILURE]["message"]
    assert crafted.id in crafted.failed_job_registry
