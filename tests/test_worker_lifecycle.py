"""A job's life through a real burst worker and the real engine: claim, progress, result,
timeout, cancel, priorities, and every failure code a real bad input produces.

The engine runs the tiny random-weight e2b checkpoint: its text is noise, but greedy
decoding is deterministic, so a job's result must equal what ``Engine.run`` gives for the
same decoded clip, instruction and budget. Jobs that must still be generating when their
deadline passes or they are canceled run on ``long_tone`` (see worker_fixtures).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import make_tone
from rq.job import Job
from worker_fixtures import (TEST_DEFAULT_MAX_NEW_TOKENS, WEED_KEY, enqueue, failure_code, fetch,  # noqa: F401
                             long_tone, run_burst, seaweedfs, worker_settings, write_wav)

from producer import record
from producer.schema import JobRequest, JobResult
from worker.audio import decode_audio
from worker.gemma4.engine import ClipOutput, ClipRequest
from worker.gemma4.features import audio_token_count
from worker.instructions import instruction_for


@pytest.fixture
def wav(tmp_path):
    return write_wav(tmp_path / "ok.wav", make_tone(1.25, sr=22_050), rate=22_050)


@pytest.fixture
def long_wav(tmp_path):
    return long_tone(tmp_path / "long.wav")


def run_one(redis_url, redis_conn, engine, request: dict, **overrides):
    job = enqueue(redis_conn, request)
    run_burst(worker_settings(redis_url, **overrides), engine)
    return fetch(redis_conn, job.id)


def run_directly(engine, path, request: dict, budget: int) -> ClipOutput:
    """What the engine gives for the worker's clip, instruction and budget, without a worker."""
    (output,) = engine.run([ClipRequest(decode_audio(path), instruction_for(JobRequest(**request)), budget)])
    return output


# ------------------------------------------------------------------ success
def test_a_good_job_returns_the_engines_result_and_records_progress_and_attempt(redis_url, redis_conn, engine,
                                                                                wav):
    request = {"audio_uri": wav.as_uri(), "metadata": {"batch": 7}}
    job = run_one(redis_url, redis_conn, engine, request)
    assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)
    result = JobResult.model_validate(job.return_value())
    expected = run_directly(engine, wav, request, TEST_DEFAULT_MAX_NEW_TOKENS)
    assert expected.tokens  # the comparison below is between real generations, not two empty strings
    assert result.text == expected.text and result.tokens == len(expected.tokens) <= TEST_DEFAULT_MAX_NEW_TOKENS
    assert result.model == engine.model_id and result.audio_seconds == pytest.approx(1.25, abs=0.01)
    assert [(s.start, s.end, s.text) for s in result.segments] == [(0.0, result.audio_seconds, result.text)]
    assert result.audio_tokens == audio_token_count(20_000) == expected.audio_tokens
    assert result.metadata == {"batch": 7}
    stages = {"fetch", "decode_audio", "front_end", "audio_tower", "prefill", "generate"}
    assert stages <= set(result.timings) and all(result.timings[s] >= 0 for s in stages)
    meta = job.get_meta()
    assert meta[record.META_ATTEMPT] == 1 and meta[record.META_PROGRESS]["stage"] == "generate"
    assert record.META_FAILURE not in meta and meta[record.META_REQUEST]["audio_uri"] == wav.as_uri()


def test_outputs_are_written_when_the_request_names_an_output_uri(redis_url, redis_conn, engine, wav, tmp_path):
    job = run_one(redis_url, redis_conn, engine, {"audio_uri": wav.as_uri(), "output_uri": (tmp_path / "out").as_uri()})
    result = JobResult.model_validate(job.return_value())
    assert result.output_uris == [(tmp_path / "out" / f"{job.id}.json").as_uri(),
                                  (tmp_path / "out" / f"{job.id}.txt").as_uri()]
    stored = JobResult.model_validate_json((tmp_path / "out" / f"{job.id}.json").read_text())
    assert stored.text == result.text and stored.output_uris == result.output_uris
    assert (tmp_path / "out" / f"{job.id}.txt").read_text() == result.text + "\n"
    assert job.get_meta()[record.META_PROGRESS]["stage"] == "write" and "write" in result.timings


def writes_to_job(redis_conn, job_id: str, action) -> list[str]:
    """The fields of the job's hash HSET while ``action()`` runs, as Redis MONITOR reports them.

    (Counting the server's HSET calls would also count the scheduler's heartbeat, which the
    worker's maintenance thread writes a few times a second, however long the job runs.)
    """
    db = redis_conn.connection_pool.connection_kwargs.get("db", 0)
    key, done = Job.key_for(job_id), f"writes-to-job-done-{job_id}"
    writes: list[str] = []
    monitoring = threading.Event()

    def listen():
        with redis_conn.monitor() as monitor:
            monitoring.set()
            for command in monitor.listen():
                if done in command["command"]:
                    return
                if command["db"] == db and command["command"].startswith(f"HSET {key} "):
                    writes.append(command["command"].split(" ", 3)[2])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert monitoring.wait(10)
    action()
    redis_conn.echo(done)
    listener.join(10)
    assert not listener.is_alive()
    return writes


def test_progress_is_written_per_stage_not_per_decode_step(redis_url, redis_conn, engine, long_wav):
    stages = ["claimed", "fetch", "decode_audio", "front_end", "audio_tower", "prefill", "generate"]

    def meta_writes(tokens: int) -> int:
        job = enqueue(redis_conn, {"audio_uri": long_wav.as_uri(), "max_new_tokens": tokens})
        fields = writes_to_job(redis_conn, job.id, lambda: run_burst(worker_settings(redis_url), engine))
        assert "status" in fields  # the monitor saw the job's record being written
        job = fetch(redis_conn, job.id)
        assert job.return_value()["tokens"] == tokens  # every decode step of the budget really ran
        assert job.get_meta()[record.META_PROGRESS]["stage"] == "generate"
        return fields.count("meta")

    # at most one progress write per stage entered, however many decode steps: stages entered while
    # the records thread still writes an earlier one are written once, as the newest
    for tokens in (300, 2):
        assert 3 <= meta_writes(tokens) <= len(stages)


def test_requested_max_new_tokens_reaches_the_engine(redis_url, redis_conn, engine, long_wav):
    request = {"audio_uri": long_wav.as_uri(), "max_new_tokens": 5}
    job = run_one(redis_url, redis_conn, engine, request)
    assert job.return_value()["tokens"] == 5 != TEST_DEFAULT_MAX_NEW_TOKENS
    assert job.return_value()["text"] == run_directly(engine, long_wav, request, 5).text


# ------------------------------------------------------------------ failures from real bad inputs
def truncated_wav(tmp_path):
    path = write_wav(tmp_path / "whole.wav", make_tone(3.0))
    (tmp_path / "cut.wav").write_bytes(path.read_bytes()[:30_000])
    return (tmp_path / "cut.wav").as_uri()


def nan_wav(tmp_path):
    samples = make_tone(1.0)
    samples[5] = np.nan
    return write_wav(tmp_path / "nan.wav", samples, subtype="FLOAT").as_uri()


def text_file(tmp_path):
    (tmp_path / "a.wav").write_text("not audio at all\n" * 10)
    return (tmp_path / "a.wav").as_uri()


def m4a_header(tmp_path):
    """The first bytes of an ffmpeg M4A, then junk: what the sniffer reads."""
    (tmp_path / "fake.m4a").write_bytes(b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00" + bytes(range(256)) * 8)
    return (tmp_path / "fake.m4a").as_uri()


def zero_frames(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16_000)
    return (tmp_path / "zero.wav").as_uri()


def few_samples(tmp_path):
    return write_wav(tmp_path / "few.wav", make_tone(0.005)).as_uri()


def too_long(tmp_path):
    return write_wav(tmp_path / "long.wav", make_tone(31.0)).as_uri()


def too_large(tmp_path):
    return write_wav(tmp_path / "big.wav", make_tone(4.0)).as_uri()  # 128 kB, over the limit set below


@pytest.mark.parametrize("make_uri,code,says,limits", [
    (lambda tmp: (tmp / "missing.wav").as_uri(), "audio_not_found", "no such file", {}),
    (text_file, "unsupported_format", "not a recognised audio file", {}),
    (m4a_header, "unsupported_format", "MP4/M4A", {}),
    (truncated_wav, "corrupt_audio", "truncated", {}),
    (nan_wav, "corrupt_audio", "NaN", {}),
    (zero_frames, "empty_audio", "no audio samples", {}),
    (few_samples, "empty_audio", "at least 161 samples", {}),
    (too_long, "audio_too_long", "at most 30 s", {"max_audio_seconds": 30}),
    (too_large, "audio_too_large", "at most 0.1 MB", {"max_audio_bytes": 100_000}),
])
def test_bad_audio_fails_with_its_code_and_the_worker_moves_on(redis_url, redis_conn, engine, tmp_path, wav,
                                                              make_uri, code, says, limits):
    bad = enqueue(redis_conn, {"audio_uri": make_uri(tmp_path)})
    good = enqueue(redis_conn, {"audio_uri": wav.as_uri()})
    run_burst(worker_settings(redis_url, **limits), engine)
    bad = fetch(redis_conn, bad.id)
    failure = bad.get_meta()[record.META_FAILURE]
    assert bad.get_status() == "failed" and failure["code"] == code and says in failure["message"]
    assert failure["attempt"] == 1 and failure["retryable"] is False and failure["worker"]
    assert bad.latest_result().exc_string == f"{code}: {failure['message']}"
    assert fetch(redis_conn, good.id).get_status() == "finished"


def test_s3_failures_through_the_worker_leave_no_temp_files(redis_url, redis_conn, engine, s3_bucket, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="notes.wav", Body=b"just some text, not audio" * 10)
    client.put_object(Bucket=bucket, Key="ok.wav", Body=write_wav(tmp_path / "ok.wav", make_tone(1.0)).read_bytes())
    jobs = {uri: enqueue(redis_conn, {"audio_uri": uri}) for uri in
            (f"s3://{bucket}/missing.wav", "s3://no-such-bucket-x/a.wav", f"s3://{bucket}/notes.wav",
             f"s3://{bucket}/ok.wav")}
    (tmp_path / "tmp").mkdir()
    run_burst(worker_settings(redis_url, s3_endpoint_url=s3_bucket[0].meta.endpoint_url, s3_region="us-east-1",
                              temp_dir=str(tmp_path / "tmp")), engine)
    codes = {uri: failure_code(fetch(redis_conn, job.id)) for uri, job in jobs.items()}
    assert codes == {f"s3://{bucket}/missing.wav": "audio_not_found", "s3://no-such-bucket-x/a.wav": "audio_not_found",
                     f"s3://{bucket}/notes.wav": "unsupported_format", f"s3://{bucket}/ok.wav": None}
    assert fetch(redis_conn, jobs[f"s3://{bucket}/ok.wav"].id).get_status() == "finished"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_wrong_storage_credentials_fail_as_access_denied(redis_url, redis_conn, engine, seaweedfs,  # noqa: F811
                                                         monkeypatch, wav):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    denied = enqueue(redis_conn, {"audio_uri": "s3://audio/probe"})
    good = enqueue(redis_conn, {"audio_uri": wav.as_uri()})
    run_burst(worker_settings(redis_url, s3_endpoint_url=seaweedfs, s3_region="us-east-1"), engine)
    failure = fetch(redis_conn, denied.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "access_denied" and not failure["retryable"]
    assert fetch(redis_conn, good.id).get_status() == "finished"


@pytest.mark.parametrize("output,says", [
    (lambda tmp, bucket: "s3://no-such-out-bucket/results", "bucket 'no-such-out-bucket' does not exist"),
    (lambda tmp, bucket: (tmp / "taken" / "out").as_uri(), "cannot hold outputs"),
])
def test_an_output_location_that_cannot_exist_fails_the_job_before_its_audio_is_fetched(
        redis_url, redis_conn, engine, s3_bucket, tmp_path, output, says):
    client, bucket = s3_bucket
    (tmp_path / "taken").write_text("a file, not a directory")
    # The audio is missing too: fetching it first would fail as audio_not_found instead.
    job = enqueue(redis_conn, {"audio_uri": f"s3://{bucket}/missing.wav", "output_uri": output(tmp_path, bucket)})
    run_burst(worker_settings(redis_url, s3_endpoint_url=client.meta.endpoint_url, s3_region="us-east-1"), engine)
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "invalid_request" and says in failure["message"]
    assert job.get_meta()[record.META_PROGRESS]["stage"] == "claimed"


def test_outputs_refused_by_storage_fail_as_access_denied(redis_url, redis_conn, engine, seaweedfs,  # noqa: F811
                                                          monkeypatch, wav):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    job = enqueue(redis_conn, {"audio_uri": wav.as_uri(), "output_uri": "s3://audio/out"})
    run_burst(worker_settings(redis_url, s3_endpoint_url=seaweedfs, s3_region="us-east-1"), engine)
    job = fetch(redis_conn, job.id)
    assert failure_code(job) == "access_denied" and job.get_meta()[record.META_PROGRESS]["stage"] == "write"


def test_max_new_tokens_over_the_limit_is_refused_not_clamped(redis_url, redis_conn, engine, wav):
    job = run_one(redis_url, redis_conn, engine, {"audio_uri": wav.as_uri(), "max_new_tokens": 5000})
    assert failure_code(job) == "invalid_request"
    assert "above this worker's limit of 2048" in job.get_meta()[record.META_FAILURE]["message"]


# ------------------------------------------------------------------ timeout and cancel
def test_a_job_past_its_audio_derived_budget_times_out_while_generating(redis_url, redis_conn, engine, long_wav):
    job = enqueue(redis_conn, {"audio_uri": long_wav.as_uri(), "max_new_tokens": 2048})  # ~13 s of decoding
    started = time.monotonic()
    run_burst(worker_settings(redis_url, job_timeout_base=0.5, job_timeout_per_audio_second=0.25), engine)
    elapsed = time.monotonic() - started
    failure = fetch(redis_conn, job.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "timeout" and "at stage generate" in failure["message"]
    assert "budget of 1.0 s" in failure["message"] and "2.0 s of audio" in failure["message"]
    assert elapsed < 5  # stopped at its deadline, not after the whole budget


def test_rqs_hard_time_limit_fires_during_generation_and_records_timeout(redis_url, redis_conn, engine, long_wav):
    """The backstop behind the cooperative deadline, for real: RQ's SIGALRM (job timeout =
    settings.hard_timeout, here forced to 2 s) interrupts the engine mid-generation."""
    settings = worker_settings(redis_url, test_hard_timeout=2, lost_after=2.0)
    assert settings.job_budget(2.0) > 60  # the cooperative deadline is far away
    job = enqueue(redis_conn, {"audio_uri": long_wav.as_uri(), "max_new_tokens": 2048}, settings=settings)
    assert job.timeout == settings.hard_timeout == 2  # what the producer wrote
    started = time.monotonic()
    run_burst(settings, engine)
    elapsed = time.monotonic() - started
    job = fetch(redis_conn, job.id)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "timeout"
    assert "hard time limit" in failure["message"] and record.META_LOST not in job.get_meta()
    assert job.get_meta()[record.META_PROGRESS]["stage"] == "generate"
    assert 2.0 <= (job.ended_at - job.started_at).total_seconds() and elapsed < 2.0 + 4.0


def test_the_hard_time_limit_ends_only_the_job_that_ran_out_of_time(redis_url, redis_conn, engine, long_wav, wav):
    """The alarm interrupts a decode step that several jobs share: the one with the most time
    charged fails ``timeout``; the job beside it runs its clip again and finishes."""
    settings = worker_settings(redis_url, test_hard_timeout=2, lost_after=2.0, batch_max_jobs=2, prefetch_jobs=2)
    long = enqueue(redis_conn, {"audio_uri": long_wav.as_uri(), "max_new_tokens": 2048}, settings=settings)
    short = [enqueue(redis_conn, {"audio_uri": wav.as_uri(), "max_new_tokens": 60}, settings=settings,
                     job_id=f"beside-{n}") for n in range(12)]  # one always shares the steps of the long job
    run_burst(settings, engine)
    long = fetch(redis_conn, long.id)
    assert long.get_status() == "failed" and long.get_meta()[record.META_FAILURE]["code"] == "timeout"
    assert [fetch(redis_conn, job.id).get_status() for job in short] == ["finished"] * len(short)


def test_the_budget_grows_with_the_audio_length(redis_url, redis_conn, engine, long_wav):
    job = run_one(redis_url, redis_conn, engine, {"audio_uri": long_wav.as_uri(), "max_new_tokens": 150},
                  job_timeout_base=0.2, job_timeout_per_audio_second=4.0)
    assert job.get_status() == "finished" and job.return_value()["tokens"] == 150
    # It ran past the base alone: only the 2 s of audio's share (8 s) kept it from timing out.
    assert (job.ended_at - job.started_at).total_seconds() > 0.2


def test_a_job_canceled_while_queued_stops_at_claim(redis_url, redis_conn, engine, tmp_path):
    job = enqueue(redis_conn, {"audio_uri": (tmp_path / "never-fetched.wav").as_uri()})
    redis_conn.set(record.cancel_key(job.id), "1")
    run_burst(worker_settings(redis_url), engine)
    failure = fetch(redis_conn, job.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "canceled" and "at stage claimed" in failure["message"]


def test_a_running_job_is_canceled_during_generation(redis_url, redis_conn, engine, long_wav):
    job = enqueue(redis_conn, {"audio_uri": long_wav.as_uri(), "max_new_tokens": 2048})  # ~13 s of decoding

    def cancel_when_generating():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (job.get_meta(refresh=True).get(record.META_PROGRESS) or {}).get("stage") == "generate":
                redis_conn.set(record.cancel_key(job.id), "1")
                return
            time.sleep(0.01)

    canceller = threading.Thread(target=cancel_when_generating)
    canceller.start()
    started = time.monotonic()
    run_burst(worker_settings(redis_url), engine)
    canceller.join()
    failure = fetch(redis_conn, job.id).get_meta()[record.META_FAILURE]
    assert failure["code"] == "canceled" and "at stage generate" in failure["message"]
    assert time.monotonic() - started < 5  # stopped within the check interval, not after 2048 tokens


def test_queues_are_served_highest_priority_first(redis_url, redis_conn, engine, wav):
    jobs = [enqueue(redis_conn, {"audio_uri": wav.as_uri(), "metadata": {"q": q}}, queue=q, job_id=f"job-{n}")
            for n, q in enumerate(("low", "default", "high", "default"))]
    run_burst(worker_settings(redis_url), engine)
    started = sorted((fetch(redis_conn, job.id).started_at, job.origin) for job in jobs)
    assert [origin for _, origin in started] == ["high", "default", "default", "low"]
