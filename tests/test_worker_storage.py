"""Fetching audio and writing outputs against real S3 servers (moto; SeaweedFS for auth) and files."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from conftest import make_tone
from http_servers import stalling_s3  # noqa: F401 (fixture)
from worker_fixtures import (WEED_KEY, WEED_SECRET, closed_endpoint, enqueue, enqueue_raw, failure_code,  # noqa: F401
                             fetch, run_burst, seaweedfs, worker_settings, write_wav)

from producer.failures import AudioqError, FailureCode
from producer.schema import JobResult, Segment
from producer.settings import Settings
from producer import record
from worker.storage import check_output, fetched_audio, output_uris, write_outputs


@pytest.fixture
def settings(s3_env, tmp_path):
    (tmp_path / "tmp").mkdir()
    return Settings(s3_endpoint_url=s3_env, s3_region="us-east-1", temp_dir=str(tmp_path / "tmp"))


def fetch_fails(code: FailureCode, uri: str, settings: Settings) -> str:
    with pytest.raises(AudioqError) as info:
        with fetched_audio(uri, settings):
            pass
    assert info.value.code == code, info.value
    return info.value.message


def result(text="hello there") -> JobResult:
    return JobResult(text=text, segments=[Segment(start=0, end=1.0, text=text)], model="m", audio_seconds=1.0,
                     timings={}, worker="w", tokens=3, audio_tokens=25)


# ------------------------------------------------------------------ s3://
def test_s3_object_streams_to_a_temp_file_that_is_removed(s3_bucket, settings, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="dir/a.flac", Body=b"x" * 3_000_000)
    with fetched_audio(f"s3://{bucket}/dir/a.flac", settings) as path:
        assert path.read_bytes() == b"x" * 3_000_000 and path.suffix == ".flac"
        assert path.is_relative_to(tmp_path / "tmp")
    assert not any((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("key", ["odd#name.wav", "what?.flac", "/leading-slash.wav", "spaces and é.wav"])
def test_keys_are_taken_byte_for_byte(s3_bucket, settings, key):
    """``#`` and ``?`` are part of an S3 key, not a URL fragment or query."""
    client, bucket = s3_bucket
    decoy = key.split("#")[0].split("?")[0].lstrip("/")  # what a URL parser would make of it
    if decoy != key:
        client.put_object(Bucket=bucket, Key=decoy, Body=b"decoy")
    client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    with fetched_audio(f"s3://{bucket}/{key}", settings) as path:
        assert path.read_bytes() == key.encode()


def test_temp_file_is_removed_when_the_block_raises(s3_bucket, settings, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a.wav", Body=b"RIFF")
    with pytest.raises(RuntimeError):
        with fetched_audio(f"s3://{bucket}/a.wav", settings):
            raise RuntimeError("decode blew up")
    assert not any((tmp_path / "tmp").iterdir())


def test_missing_key_is_audio_not_found(s3_bucket, settings):
    _, bucket = s3_bucket
    message = fetch_fails(FailureCode.AUDIO_NOT_FOUND, f"s3://{bucket}/nope.wav", settings)
    assert f"bucket {bucket!r} has no object 'nope.wav'" in message


def test_missing_bucket_is_audio_not_found(s3_env, settings):
    message = fetch_fails(FailureCode.AUDIO_NOT_FOUND, "s3://no-such-bucket-here/a.wav", settings)
    assert "bucket 'no-such-bucket-here' does not exist" in message


def test_object_over_the_size_limit_is_refused_before_download(s3_bucket, settings, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="big.wav", Body=b"x" * 2000)
    message = fetch_fails(FailureCode.AUDIO_TOO_LARGE, f"s3://{bucket}/big.wav",
                          settings.model_copy(update={"max_audio_bytes": 1000}))
    assert "0.0 MB" in message and "max_audio_bytes" in message
    assert not any((tmp_path / "tmp").iterdir())


def test_closed_port_is_storage_unavailable_and_fails_fast(settings):
    started = time.monotonic()
    message = fetch_fails(FailureCode.STORAGE_UNAVAILABLE, "s3://audio/a.wav",
                          settings.model_copy(update={"s3_endpoint_url": closed_endpoint()}))
    assert "cannot reach storage" in message
    assert time.monotonic() - started < 10


def test_wrong_secret_is_access_denied(seaweedfs, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    settings = Settings(s3_endpoint_url=seaweedfs, s3_region="us-east-1", temp_dir=str(tmp_path))
    message = fetch_fails(FailureCode.ACCESS_DENIED, "s3://audio/probe", settings)
    assert "check this worker's credentials" in message


def test_unknown_access_key_is_access_denied(seaweedfs, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WEED_SECRET)
    settings = Settings(s3_endpoint_url=seaweedfs, s3_region="us-east-1", temp_dir=str(tmp_path))
    fetch_fails(FailureCode.ACCESS_DENIED, "s3://audio/probe", settings)


def test_right_keys_fetch_from_seaweedfs(seaweedfs, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WEED_SECRET)
    settings = Settings(s3_endpoint_url=seaweedfs, s3_region="us-east-1", temp_dir=str(tmp_path))
    with fetched_audio("s3://audio/probe", settings) as path:
        assert path.read_bytes() == b"ok"


# ------------------------------------------------------------------ file://
def test_file_uri_is_read_in_place(tmp_path):
    (tmp_path / "a b.wav").write_bytes(b"RIFF....")
    with fetched_audio((tmp_path / "a b.wav").as_uri(), Settings()) as path:
        assert path == tmp_path / "a b.wav"
    assert (tmp_path / "a b.wav").exists()


def test_missing_file_and_directory_are_audio_not_found(tmp_path):
    assert "no such file" in fetch_fails(FailureCode.AUDIO_NOT_FOUND, (tmp_path / "x.wav").as_uri(), Settings())
    assert "not a regular file" in fetch_fails(FailureCode.AUDIO_NOT_FOUND, tmp_path.as_uri(), Settings())


def test_file_paths_that_cannot_name_a_file_are_invalid_request(tmp_path):
    assert "NUL byte" in fetch_fails(FailureCode.INVALID_REQUEST, f"{tmp_path.as_uri()}/a%00b.wav", Settings())
    assert "too long" in fetch_fails(FailureCode.INVALID_REQUEST, (tmp_path / ("x" * 300)).as_uri(), Settings())


def test_a_path_under_a_regular_file_or_through_a_symlink_loop_is_audio_not_found(tmp_path):
    (tmp_path / "file.wav").write_bytes(b"RIFF")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    fetch_fails(FailureCode.AUDIO_NOT_FOUND, (tmp_path / "file.wav" / "x.wav").as_uri(), Settings())
    assert "symlink loop" in fetch_fails(FailureCode.AUDIO_NOT_FOUND, (tmp_path / "loop-a").as_uri(), Settings())


def test_file_uris_can_be_switched_off(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    settings = Settings(allow_file_uris=False)
    assert "allow_file_uris" in fetch_fails(FailureCode.ACCESS_DENIED, (tmp_path / "a.wav").as_uri(), settings)
    output_fails(FailureCode.ACCESS_DENIED, lambda: check_output((tmp_path / "out").as_uri(), settings))
    output_fails(FailureCode.ACCESS_DENIED, lambda: write_outputs(tmp_path.as_uri(), "job", result(), settings))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.fixture
def rooted(tmp_path):
    """A file root holding a.wav, a file outside it, and a symlink inside pointing out."""
    root, outside = tmp_path / "root", tmp_path / "outside.wav"
    root.mkdir()
    (root / "a.wav").write_bytes(b"RIFF")
    outside.write_bytes(b"RIFF")
    (root / "link.wav").symlink_to(outside)
    (root / "out-link").symlink_to(tmp_path)
    return root, Settings(file_roots=[str(root)])


def test_file_roots_let_paths_inside_them_through(rooted):
    root, settings = rooted
    with fetched_audio((root / "a.wav").as_uri(), settings) as path:
        assert path == root / "a.wav"
    check_output((root / "out").as_uri(), settings)
    write_outputs((root / "out").as_uri(), "job-7", result(), settings)
    assert (root / "out" / "job-7.txt").exists()


@pytest.mark.parametrize("where", ["../outside.wav", "link.wav", "/etc/passwd"])
def test_file_roots_refuse_paths_that_lead_out_of_them(rooted, where):
    root, settings = rooted
    uri = Path(where).as_uri() if where.startswith("/") else f"{root.as_uri()}/{where}"
    assert "file_roots" in fetch_fails(FailureCode.ACCESS_DENIED, uri, settings)


@pytest.mark.parametrize("where", ["../out", "out-link/elsewhere"])
def test_file_roots_refuse_output_prefixes_that_lead_out_of_them(rooted, where):
    root, settings = rooted
    prefix = f"{root.as_uri()}/{where}"
    output_fails(FailureCode.ACCESS_DENIED, lambda: check_output(prefix, settings))
    output_fails(FailureCode.ACCESS_DENIED, lambda: write_outputs(prefix, "job-8", result(), settings))
    assert not (root.parent / "out").exists() and not (root.parent / "elsewhere").exists()


def test_only_allowed_buckets_are_read_or_written(s3_bucket, settings):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a.wav", Body=b"RIFF")
    allowed = settings.model_copy(update={"allowed_buckets": [bucket]})
    with fetched_audio(f"s3://{bucket}/a.wav", allowed) as path:
        assert path.read_bytes() == b"RIFF"
    other = settings.model_copy(update={"allowed_buckets": ["some-other-bucket"]})
    message = fetch_fails(FailureCode.ACCESS_DENIED, f"s3://{bucket}/a.wav", other)
    assert "allowed_buckets: some-other-bucket" in message
    output_fails(FailureCode.ACCESS_DENIED, lambda: check_output(f"s3://{bucket}/out/", other))
    output_fails(FailureCode.ACCESS_DENIED, lambda: write_outputs(f"s3://{bucket}/out/", "j", result(), other))
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="out/")


def test_file_over_the_size_limit_is_refused(tmp_path):
    (tmp_path / "big.wav").write_bytes(b"x" * 2000)
    fetch_fails(FailureCode.AUDIO_TOO_LARGE, (tmp_path / "big.wav").as_uri(), Settings(max_audio_bytes=1000))


# ------------------------------------------------------------------ outputs
def output_fails(code: FailureCode, action) -> str:
    with pytest.raises(AudioqError) as info:
        action()
    assert info.value.code == code, info.value
    return info.value.message


def test_outputs_are_written_to_s3(s3_bucket, settings):
    client, bucket = s3_bucket
    check_output(f"s3://{bucket}/out/", settings)
    write_outputs(f"s3://{bucket}/out/", "job-1", result(), settings)
    assert output_uris(f"s3://{bucket}/out/", "job-1") == (f"s3://{bucket}/out/job-1.json",
                                                          f"s3://{bucket}/out/job-1.txt")
    body = json.loads(client.get_object(Bucket=bucket, Key="out/job-1.json")["Body"].read())
    assert body["text"] == "hello there" and body["audio_tokens"] == 25
    txt = client.get_object(Bucket=bucket, Key="out/job-1.txt")
    assert txt["Body"].read() == b"hello there\n" and txt["ContentType"].startswith("text/plain")


def test_outputs_are_written_to_files(tmp_path):
    prefix = (tmp_path / "out" / "deeper").as_uri()
    check_output(prefix, Settings())
    write_outputs(prefix, "job-2", result("hi"), Settings())
    assert json.loads((tmp_path / "out" / "deeper" / "job-2.json").read_text())["text"] == "hi"
    assert (tmp_path / "out" / "deeper" / "job-2.txt").read_text() == "hi\n"
    assert sorted(p.name for p in (tmp_path / "out" / "deeper").iterdir()) == ["job-2.json", "job-2.txt"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_get_the_usual_mode_under_the_umask(tmp_path, umask, mode):
    """Not mkstemp's 0600: whoever reads the outputs is rarely the worker's own user."""
    previous = os.umask(umask)
    try:
        write_outputs(tmp_path.as_uri(), "job-4", result(), Settings())
    finally:
        os.umask(previous)
    for name in ("job-4.json", "job-4.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_output_to_a_missing_bucket_is_invalid_request_before_and_when_writing(s3_env, settings):
    for action in (lambda: check_output("s3://no-such-out-bucket/x", settings),
                   lambda: write_outputs("s3://no-such-out-bucket/x", "job-3", result(), settings)):
        message = output_fails(FailureCode.INVALID_REQUEST, action)
        assert "bucket 'no-such-out-bucket' does not exist" in message


def test_output_check_with_storage_down_is_storage_unavailable(settings):
    output_fails(FailureCode.STORAGE_UNAVAILABLE, lambda: check_output(
        "s3://audio/out", settings.model_copy(update={"s3_endpoint_url": closed_endpoint()})))


def test_output_under_a_regular_file_is_invalid_request(tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    prefix = (tmp_path / "taken" / "out").as_uri()
    message = output_fails(FailureCode.INVALID_REQUEST, lambda: check_output(prefix, Settings()))
    assert "cannot hold outputs" in message
    output_fails(FailureCode.INVALID_REQUEST, lambda: write_outputs(prefix, "job-5", result(), Settings()))
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]


def test_an_output_directory_the_file_system_cannot_hold_is_invalid_request(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    message = output_fails(FailureCode.INVALID_REQUEST, lambda: check_output("file:///proc/audioq/out", Settings()))
    assert "cannot hold outputs" in message


def test_a_refused_head_bucket_is_not_taken_as_a_refused_write(seaweedfs, monkeypatch):  # noqa: F811
    """HeadBucket needs ListBucket, which a write-only role may lack: only the write itself can tell."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    settings = Settings(s3_endpoint_url=seaweedfs, s3_region="us-east-1")
    check_output("s3://audio/out", settings)  # the HEAD was refused (403): no verdict
    message = output_fails(FailureCode.ACCESS_DENIED, lambda: write_outputs("s3://audio/out", "job-6", result(),
                                                                            settings))
    assert "check this worker's credentials" in message


# ------------------------------------------------------------------ bounds on one attempt
def timed_fetch_fails(code: FailureCode, uri: str, settings: Settings, **options) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(AudioqError) as info:
        with fetched_audio(uri, settings, **options):
            pass
    assert info.value.code == code, info.value
    return info.value.message, time.monotonic() - started


def test_a_server_that_never_answers_costs_one_attempt_timeout(settings, stalling_s3):  # noqa: F811
    server = stalling_s3("silent")
    bounded = settings.model_copy(update={"s3_endpoint_url": server.url, "s3_attempt_timeout": 1.0})
    message, took = timed_fetch_fails(FailureCode.STORAGE_UNAVAILABLE, "s3://audio/a.wav", bounded)
    assert "within 1 s (s3_attempt_timeout)" in message and 1.0 <= took < 5  # not 3 x the 60 s read timeout


def test_a_dripping_body_is_cut_off_at_the_attempt_timeout(settings, stalling_s3, tmp_path):  # noqa: F811
    server = stalling_s3("drip", size=100_000, interval=0.01)  # every read gets a byte; the body takes 1000 s
    bounded = settings.model_copy(update={"s3_endpoint_url": server.url, "s3_attempt_timeout": 1.5})
    message, took = timed_fetch_fails(FailureCode.STORAGE_UNAVAILABLE, "s3://audio/a.wav", bounded)
    assert 1.5 <= took < 5 and server.requests == ["GET"]  # one request: the size comes from its headers
    assert not any((tmp_path / "tmp").iterdir())


def test_the_job_deadline_applies_during_the_download(settings, stalling_s3):  # noqa: F811
    server = stalling_s3("drip", size=100_000, interval=0.01)
    message, took = timed_fetch_fails(FailureCode.TIMEOUT, "s3://audio/a.wav",
                                      settings.model_copy(update={"s3_endpoint_url": server.url}),
                                      deadline=time.monotonic() + 1.0)
    assert "time budget ran out while downloading s3://audio/a.wav" in message and took < 5


def test_output_checks_and_writes_are_bounded_too(settings, stalling_s3):  # noqa: F811
    server = stalling_s3("silent")
    bounded = settings.model_copy(update={"s3_endpoint_url": server.url, "s3_attempt_timeout": 1.0})
    for action in (lambda: check_output("s3://audio/out/", bounded),
                   lambda: write_outputs("s3://audio/out/", "job-9", result(), bounded)):
        started = time.monotonic()
        output_fails(FailureCode.STORAGE_UNAVAILABLE, action)
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------ in a worker
@pytest.fixture
def aws_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def test_a_silent_server_costs_a_job_its_attempt_bounds_and_every_retry_is_logged(
        redis_url, redis_conn, engine, stalling_s3, aws_keys, caplog):  # noqa: F811
    server = stalling_s3("silent")
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        run_burst(worker_settings(redis_url, s3_endpoint_url=server.url, s3_attempt_timeout=1.0, storage_retries=2,
                                  storage_retry_backoff=[0.0, 1.0]), engine)
    took = time.monotonic() - started
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "failed" and failure_code(job) == "storage_unavailable"
    assert job.get_meta()[record.META_ATTEMPT] == 3 and took < 20  # three 1 s attempts and 1 s of backoff
    lines = [r.getMessage() for r in caplog.records if job.id in r.getMessage() and "storage unavailable" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "attempt 1" in lines[0] and "retry 1 of 2 in 0 s, at " in lines[0]
    assert "attempt 2" in lines[1] and "retry 2 of 2 in 1 s, at " in lines[1]
    assert "attempt 3" in lines[2] and "no retries left (storage_retries = 2)" in lines[2]


def test_a_slow_drip_download_ends_at_the_job_deadline(redis_url, redis_conn, engine, stalling_s3,
                                                        aws_keys):  # noqa: F811
    server = stalling_s3("drip", size=100_000, interval=0.01)
    job = enqueue(redis_conn, {"audio_uri": "s3://audio/a.wav"})
    started = time.monotonic()
    run_burst(worker_settings(redis_url, s3_endpoint_url=server.url, job_timeout_base=2.0,
                              job_timeout_per_audio_second=0.0), engine)
    assert failure_code(fetch(redis_conn, job.id)) == "timeout" and time.monotonic() - started < 10


@pytest.mark.parametrize("make, code", [
    (lambda tmp: f"{tmp.as_uri()}/a%00b.wav", "invalid_request"),
    (lambda tmp: (tmp / ("x" * 300)).as_uri(), "invalid_request"),
    (lambda tmp: (write_wav(tmp / "ok.wav", make_tone(0.5)) / "x.wav").as_uri(), "audio_not_found"),
    (lambda tmp: ((tmp / "a").symlink_to(tmp / "b"), (tmp / "b").symlink_to(tmp / "a"), (tmp / "a").as_uri())[-1],
     "audio_not_found"),
], ids=["nul byte", "overlong name", "under a regular file", "symlink loop"])
def test_bad_local_paths_fail_with_their_code_in_a_worker(redis_url, redis_conn, engine, tmp_path, make, code):
    job = enqueue_raw(redis_conn, {"audio_uri": make(tmp_path)})
    run_burst(worker_settings(redis_url), engine)
    assert failure_code(fetch(redis_conn, job.id)) == code


def test_an_output_path_that_cannot_exist_fails_at_once_not_retried(redis_url, redis_conn, engine, tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    job = enqueue(redis_conn, {"audio_uri": write_wav(tmp_path / "ok.wav", make_tone(0.5)).as_uri(),
                               "output_uri": "file:///proc/audioq/out"})
    run_burst(worker_settings(redis_url, storage_retries=2), engine)
    job = fetch(redis_conn, job.id)
    assert failure_code(job) == "invalid_request" and job.get_meta()[record.META_ATTEMPT] == 1
    assert record.META_RETRY not in job.get_meta()
