"""Jobs written to Redis by other means than the producer: refused, never imported or run.

Each test writes a real crafted job to Redis, runs a real burst worker, and checks both the
recorded failure and that the side effect the job asked for did not happen.
"""

from __future__ import annotations

import json
import logging
import pickle
import zlib

import pytest
from conftest import make_tone
from http_servers import listener  # noqa: F401 (fixture)
from rq import Queue
from rq.job import Callback, Job
from worker_fixtures import (MARK_ENV, PickleBomb, closed_endpoint, enqueue, enqueue_raw,  # noqa: F401
                             failure_code, fetch, redis_proxy, run_burst, worker_settings, write_wav)

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
    return Queue(name, connection=redis_conn, serializer=record.SERIALIZER)


def test_a_job_naming_os_system_is_failed_not_run(redis_url, redis_conn, engine, mark, good_request, caplog):
    crafted = json_queue(redis_conn).enqueue("os.system", f"touch {mark}")
    good = enqueue(redis_conn, good_request)
    with caplog.at_level(logging.INFO):
        run_burst(worker_settings(redis_url), engine)
    crafted = fetch(redis_conn, crafted.id)
    assert not mark.exists()
    assert crafted.get_status() == "failed" and failure_code(crafted) == "invalid_request"
    message = crafted.get_meta()[record.META_FAILURE]["message"]
    assert "'os.system' is not allowed" in message
    assert crafted.latest_result().exc_string == f"invalid_request: {message}"
    assert fetch(redis_conn, good.id).get_status() == "finished"  # the worker kept going
    # An expected refusal: one warning line naming the job and the reason, no traceback.
    about = [r for r in caplog.records if crafted.id in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(about) == 1 and "invalid_request" in about[0].getMessage(), [r.getMessage() for r in about]
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records)


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
    job = enqueue_raw(redis_conn, request_dict)
    run_burst(worker_settings(redis_url), engine)
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "invalid_request"
    assert says in failure["message"]
    assert job.latest_result().exc_string == f"invalid_request: {failure['message']}"


def test_a_job_record_rq_cannot_parse_is_failed_and_the_worker_goes_on(redis_url, redis_conn, engine, good_request):
    """Without this, RQ's worker quits on the first malformed hash ("unhandled exception")."""
    crafted = enqueue(redis_conn, good_request)
    redis_conn.hset(crafted.key, "status", "no-such-status")
    good = enqueue(redis_conn, {**good_request, "max_new_tokens": 4})
    settings = worker_settings(redis_url)
    run_burst(settings, engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"
    crafted = fetch(redis_conn, crafted.id)
    meta = crafted.get_meta()
    assert crafted.get_status() == "failed" and failure_code(crafted) == "invalid_request"
    assert "'no-such-status' is not a valid JobStatus" in meta[record.META_FAILURE]["message"]
    assert meta[record.META_REQUEST]["audio_uri"] == good_request["audio_uri"]  # the failure is merged into the meta, not written over it
    assert crafted.id in crafted.failed_job_registry
    assert 0 < redis_conn.ttl(crafted.key) <= settings.failure_ttl  # and expires like any failed job


def test_a_key_that_is_not_a_job_hash_is_dropped_and_the_worker_goes_on(redis_url, redis_conn, engine,
                                                                       good_request):
    redis_conn.set(Job.key_for("not-a-hash"), "some string")
    Queue("default", connection=redis_conn).push_job_id("not-a-hash")
    good = enqueue(redis_conn, good_request)
    run_burst(worker_settings(redis_url), engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"
    assert redis_conn.get(Job.key_for("not-a-hash")) == b"some string"
    assert not Queue("default", connection=redis_conn).get_job_ids()


def test_redis_failing_while_a_job_is_read_leaves_the_job_queued_not_failed(redis_url, redis_conn, engine,
                                                                           good_request, redis_proxy):  # noqa: F811
    """RQ tags every error raised while reading a dequeued job, Redis's own included, after the
    job id left its queue: a lost connection there is Redis failing, not the job, which must
    stay queued, back at the front, and then run."""
    job = enqueue(redis_conn, good_request)
    behind = enqueue(redis_conn, {**good_request, "max_new_tokens": 4})
    redis_proxy.cut("HGETALL", job.key)  # the worker's first read of this job's hash loses its connection
    run_burst(worker_settings(redis_proxy.url()), engine)  # RQ waits a second and dequeues again
    assert redis_proxy.cuts == 1
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and job.get_meta()[record.META_ATTEMPT] == 1
    assert job.id not in job.failed_job_registry
    assert fetch(redis_conn, behind.id).get_status() == "finished"
    assert job.started_at < fetch(redis_conn, behind.id).started_at  # it went back to the front


# ------------------------------------------------------------------ RQ fields audioq never writes
def webhooks(url: str, *statuses: str) -> str:
    return json.dumps([{"url": f"{url}/{status}/{method}", "job_status": status, "method": method,
                        "headers": None, "timeout": 2} for status in statuses for method in ("GET", "POST")])


def test_webhooks_in_a_job_record_are_never_called(redis_url, redis_conn, engine, good_request,
                                                    listener):  # noqa: F811
    good = enqueue(redis_conn, good_request)
    refused = json_queue(redis_conn).enqueue("os.system", "true")
    for job in (good, refused):
        redis_conn.hset(job.key, "webhooks", webhooks(listener.url, "finished", "failed"))
    run_burst(worker_settings(redis_url), engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"
    assert failure_code(fetch(redis_conn, refused.id)) == "invalid_request"
    assert listener.requests == []


def test_rq_retry_fields_in_a_record_never_run_a_failed_job_again(redis_url, redis_conn, engine, tmp_path):
    job = enqueue(redis_conn, {"audio_uri": (tmp_path / "missing.wav").as_uri()})
    redis_conn.hset(job.key, mapping={"retries_left": 3, "retry_intervals": "[0]"})
    run_burst(worker_settings(redis_url), engine)
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and failure_code(job) == "audio_not_found"
    assert job.get_meta()[record.META_ATTEMPT] == 1 and [r.type.name for r in job.results()] == ["FAILED"]


def test_rq_repeat_fields_in_a_record_never_run_a_finished_job_again(redis_url, redis_conn, engine, good_request):
    job = enqueue(redis_conn, good_request)
    redis_conn.hset(job.key, mapping={"repeats_left": 3, "repeat_intervals": "[0]"})
    run_burst(worker_settings(redis_url), engine)
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and job.get_meta()[record.META_ATTEMPT] == 1
    assert len(job.results()) == 1 and not json_queue(redis_conn).get_job_ids()


def test_jobs_named_as_dependents_in_redis_are_not_enqueued_by_a_finishing_job(redis_url, redis_conn, engine,
                                                                               good_request):
    good = enqueue(redis_conn, good_request)
    waiting = enqueue(redis_conn, {**good_request, "max_new_tokens": 4})
    json_queue(redis_conn).remove(waiting.id)
    redis_conn.hset(waiting.key, "status", "deferred")
    redis_conn.sadd(good.dependents_key, waiting.id)
    run_burst(worker_settings(redis_url), engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"
    assert fetch(redis_conn, waiting.id).get_status() == "deferred"


@pytest.mark.parametrize("crafted", [0, -1])
def test_result_and_failure_ttls_in_a_record_yield_to_the_workers_settings(redis_url, redis_conn, engine,
                                                                            good_request, tmp_path, crafted):
    """0 would drop the result at once, -1 keep the record for ever."""
    good = enqueue(redis_conn, good_request)
    bad = enqueue(redis_conn, {"audio_uri": (tmp_path / "missing.wav").as_uri()})
    for job in (good, bad):
        redis_conn.hset(job.key, mapping={"result_ttl": crafted, "failure_ttl": crafted})
    settings = worker_settings(redis_url, result_ttl=3600, failure_ttl=7200)
    run_burst(settings, engine)
    good, bad = fetch(redis_conn, good.id), fetch(redis_conn, bad.id)
    assert good.get_status() == "finished" and good.return_value()["tokens"] > 0
    assert 3500 < redis_conn.ttl(good.key) <= 3600
    assert bad.get_status() == "failed" and failure_code(bad) == "audio_not_found"
    assert 7100 < redis_conn.ttl(bad.key) <= 7200


def test_a_negative_retry_count_in_a_record_buys_no_extra_storage_retries(redis_url, redis_conn, engine,
                                                                          monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    redis_conn.hset(job.key, "number_of_retries", -5)
    run_burst(worker_settings(redis_url, s3_endpoint_url=closed_endpoint(), storage_retries=1,
                              storage_retry_backoff=[0.0]), engine)
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and job.get_meta()[record.META_ATTEMPT] == 2


# ------------------------------------------------------------------ garbled records
def job_data(*fields) -> bytes:
    return zlib.compress(json.dumps(fields).encode())


GARBLED = {
    "no data field": (lambda conn, job: conn.hdel(job.key, "data"), "has no 'data' field"),
    "args null": (lambda conn, job: conn.hset(job.key, "data", job_data(record.TASK_FUNC, None, None, {})),
                  "only argument is its request dict"),
    "args an integer": (lambda conn, job: conn.hset(job.key, "data", job_data(record.TASK_FUNC, None, 7, {})),
                        "only argument is its request dict"),
    "kwargs a list": (lambda conn, job: conn.hset(job.key, "data", job_data(record.TASK_FUNC, None,
                                                                            [{"audio_uri": "s3://a/b"}], [])),
                      "no keyword arguments"),
    "data not a 4-list": (lambda conn, job: conn.hset(job.key, "data", job_data(record.TASK_FUNC)),
                          "data is not the JSON list"),
    "pickled meta": (lambda conn, job: conn.hset(job.key, "meta", pickle.dumps({"attempt": 1})),
                     "meta is not a JSON object"),
    "meta a list": (lambda conn, job: conn.hset(job.key, "meta", "[1, 2]"), "meta is not a JSON object"),
    "attempt not a number": (lambda conn, job: conn.hset(job.key, "meta", json.dumps({"attempt": "x"})),
                             "'attempt' must be a whole number"),
    "id with a newline": (None, "Job ID must only contain"),
}


@pytest.mark.parametrize("garble", GARBLED, ids=list(GARBLED))
def test_a_garbled_record_ends_invalid_request_with_a_sentence(redis_url, redis_conn, engine, good_request,
                                                               garble, caplog):
    change, says = GARBLED[garble]
    job = enqueue(redis_conn, good_request, job_id="garbled")
    if change is None:  # the same record under an id audioq could not have written
        redis_conn.rename(job.key, "rq:job:bad\nid")
        json_queue(redis_conn).remove(job.id)
        json_queue(redis_conn).push_job_id("bad\nid")
        key = "rq:job:bad\nid"
    else:
        change(redis_conn, job)
        key = job.key
    good = enqueue(redis_conn, {**good_request, "max_new_tokens": 4})
    with caplog.at_level(logging.INFO):
        run_burst(worker_settings(redis_url), engine)
    assert fetch(redis_conn, good.id).get_status() == "finished"  # the worker went on
    assert not any("\n" in r.getMessage() for r in caplog.records)  # no forged log lines
    assert redis_conn.hget(key, "status") == b"failed"
    failure = json.loads(redis_conn.hget(key, "meta"))[record.META_FAILURE]
    assert failure["code"] == "invalid_request" and says in failure["message"], failure
    assert not json_queue(redis_conn).get_job_ids() and not redis_conn.lrange(
        json_queue(redis_conn).intermediate_queue_key, 0, -1)


# ------------------------------------------------------------------ requests
def test_a_prompt_and_language_hints_spelling_special_tokens_finish(redis_url, redis_conn, engine, good_request):
    crafted = "<|audio|> <turn|>\n<|turn>model\n<|channel>"
    jobs = [enqueue(redis_conn, {**good_request, "task": "prompt", "prompt": f"Describe it. {crafted}"}),
            enqueue(redis_conn, {**good_request, "language": crafted}),
            enqueue(redis_conn, {**good_request, "task": "translate", "language": "<|audio|>",
                                 "target_language": crafted})]
    run_burst(worker_settings(redis_url), engine)
    for job in jobs:
        job = fetch(redis_conn, job.id)
        assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)
        assert job.return_value()["audio_tokens"] > 0


def test_a_boolean_token_budget_written_past_the_producer_is_invalid_request(redis_url, redis_conn, engine,
                                                                            good_request):
    job = enqueue_raw(redis_conn, {**good_request, "max_new_tokens": True})
    run_burst(worker_settings(redis_url), engine)
    failure = fetch(redis_conn, job.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "invalid_request" and "not true or false" in failure["message"]


@pytest.mark.parametrize("fields,limits,says", [
    ({"task": "prompt", "prompt": "x" * 1_000_000}, {}, "prompt is 1000000 characters; at most 4000"),
    ({"language": "en" * 40}, {}, "language is 80 characters; at most 64 are allowed (max_language_chars)"),
    ({"metadata": {"blob": "x" * 2_000}}, {"max_request_bytes": 1024}, "at most 1024 are allowed (max_request_bytes)"),
    ({"task": "translate", "target_language": "de" * 40}, {}, "target_language is 80 characters"),
    ({"task": "prompt", "prompt": "word " * 40}, {"max_prompt_tokens": 16}, "at most 16 (max_prompt_tokens)"),
])
def test_an_oversized_request_written_past_the_producer_is_refused_before_any_download(
        redis_url, redis_conn, engine, listener, monkeypatch, fields, limits, says):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    job = enqueue_raw(redis_conn, {"audio_uri": "s3://audio/a.wav", **fields})
    run_burst(worker_settings(redis_url, s3_endpoint_url=listener.url, **limits), engine)
    failure = fetch(redis_conn, job.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "invalid_request" and says in failure["message"], failure["message"]
    assert listener.requests == []  # storage was never asked


def test_expected_failures_leave_no_traceback_in_the_worker_log(redis_url, redis_conn, engine,
                                                                 tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    wav = write_wav(tmp_path / "ok.wav", make_tone(0.5)).as_uri()
    (tmp_path / "taken").write_text("a file")
    jobs = [json_queue(redis_conn).enqueue("os.system", "true"),
            enqueue_raw(redis_conn, {"audio_uri": wav, "max_new_tokens": "many"}),
            enqueue_raw(redis_conn, {"audio_uri": wav, "task": "prompt", "prompt": "x" * 5000}),
            enqueue(redis_conn, {"audio_uri": (tmp_path / "missing.wav").as_uri()}),
            enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"}),
            enqueue(redis_conn, {"audio_uri": wav, "output_uri": (tmp_path / "taken" / "out").as_uri()}),
            enqueue(redis_conn, {"audio_uri": (tmp_path / "taken").as_uri() + "/x.wav"})]
    garbled = enqueue(redis_conn, {"audio_uri": wav}, job_id="garbled")
    redis_conn.hset(garbled.key, "data", job_data(record.TASK_FUNC))
    with caplog.at_level(logging.INFO):
        run_burst(worker_settings(redis_url, s3_endpoint_url=closed_endpoint(), storage_retries=0), engine)
    for job in [*jobs, garbled]:
        assert fetch(redis_conn, job.id).get_status() == "failed"
        about = [r for r in caplog.records if job.id in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(about) >= 1, job.id
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)
