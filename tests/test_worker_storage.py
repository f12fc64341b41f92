"""Fetching audio and writing outputs against real S3 servers (moto; SeaweedFS for auth) and files."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from worker_fixtures import WEED_KEY, WEED_SECRET, closed_endpoint, seaweedfs  # noqa: F401 (fixture)

from producer.failures import AudioqError, FailureCode
from producer.schema import JobResult, Segment
from producer.settings import Settings
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


def test_a_refused_head_bucket_is_not_taken_as_a_refused_write(seaweedfs, monkeypatch):  # noqa: F811
    """HeadBucket needs ListBucket, which a write-only role may lack: only the write itself can tell."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WEED_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    settings = Settings(s3_endpoint_url=seaweedfs, s3_region="us-east-1")
    check_output("s3://audio/out", settings)  # the HEAD was refused (403): no verdict
    message = output_fails(FailureCode.ACCESS_DENIED, lambda: write_outputs("s3://audio/out", "job-6", result(),
                                                                            settings))
    assert "check this worker's credentials" in message
