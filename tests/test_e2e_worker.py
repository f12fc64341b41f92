"""End to end through the real engine: S3 (moto) → worker → Gemma 4 (tiny random checkpoint) → record.

The checkpoint has the real E2B architecture with random weights, so the text is noise,
but greedy decoding is deterministic: the worker's result must equal what the engine
gives for the same decoded clip and instruction, which proves the clip, the instruction
and the token budget reach the model intact. (Every worker test runs the real engine;
the deadline and cancel checks during generation are in test_worker_lifecycle, the
signals and lost workers in test_worker_liveness.)
"""

from __future__ import annotations

import json

import pytest
from conftest import make_tone
from worker_fixtures import (enqueue, failure_code, fetch, procs, run_burst, start_worker,  # noqa: F401
                             worker_settings, write_wav)

from producer import record
from producer.schema import JobRequest, JobResult
from worker.audio import decode_audio
from worker.gemma4.engine import ClipRequest
from worker.gemma4.features import audio_token_count
from worker.instructions import instruction_for
from worker.process import run_worker


@pytest.fixture
def s3_settings(redis_url, s3_bucket, tmp_path):
    (tmp_path / "tmp").mkdir()
    return worker_settings(redis_url, s3_endpoint_url=s3_bucket[0].meta.endpoint_url, s3_region="us-east-1",
                           temp_dir=str(tmp_path / "tmp"))


def test_an_s3_job_runs_through_the_real_engine_and_writes_its_outputs(redis_conn, s3_bucket, s3_settings,
                                                                       engine, tmp_path):
    client, bucket = s3_bucket
    wav = write_wav(tmp_path / "speech.wav", make_tone(1.5, sr=44_100, channels=2), rate=44_100)
    client.put_object(Bucket=bucket, Key="in/speech.wav", Body=wav.read_bytes())
    request = {"audio_uri": f"s3://{bucket}/in/speech.wav", "language": "English", "max_new_tokens": 24,
               "output_uri": f"s3://{bucket}/out"}
    job = enqueue(redis_conn, request)
    run_burst(s3_settings, engine)

    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)
    result = JobResult.model_validate(job.return_value())
    samples = decode_audio(wav)
    (expected,) = engine.run([ClipRequest(samples, instruction_for(JobRequest(**request)), 24)])
    assert result.text == expected.text and result.tokens == len(expected.tokens) <= 24
    assert result.audio_tokens == audio_token_count(samples.size) == expected.audio_tokens
    assert result.model == engine.model_id and result.audio_seconds == pytest.approx(1.5, abs=0.01)
    assert {"fetch", "decode_audio", "front_end", "audio_tower", "prefill", "generate", "write"} <= set(result.timings)
    stored = json.loads(client.get_object(Bucket=bucket, Key=f"out/{job.id}.json")["Body"].read())
    assert stored["text"] == result.text and stored["output_uris"] == result.output_uris
    assert client.get_object(Bucket=bucket, Key=f"out/{job.id}.txt")["Body"].read().decode() == result.text + "\n"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_run_worker_loads_the_model_once_and_drains_good_and_bad_jobs(redis_url, redis_conn, tiny_checkpoint,
                                                                      tmp_path):
    good = write_wav(tmp_path / "good.wav", make_tone(1.0))
    (tmp_path / "bad.wav").write_text("not audio")
    jobs = [enqueue(redis_conn, {"audio_uri": uri, "max_new_tokens": 8}, job_id=f"job-{n}")
            for n, uri in enumerate((good.as_uri(), (tmp_path / "bad.wav").as_uri(), good.as_uri()))]
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()))
    worker = start_worker(settings, tmp_path / "worker.log", burst=True)
    assert worker.wait(timeout=120) == 0
    assert [fetch(redis_conn, j.id).get_status() for j in jobs] == ["finished", "failed", "finished"]
    assert failure_code(fetch(redis_conn, jobs[1].id)) == "unsupported_format"
    log = (tmp_path / "worker.log").read_text()
    assert log.count("loaded in") == 1


def test_a_worker_refuses_to_start_on_a_model_without_an_audio_tower(redis_url, redis_conn, tiny_checkpoint,
                                                                     tmp_path, caplog):
    """Draining a backlog into model_error failures would lose a night: the worker won't start."""
    job = enqueue(redis_conn, {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri()})
    settings = worker_settings(redis_url).model_copy(update={"model": str(tiny_checkpoint(with_audio=False))})
    assert run_worker(settings, burst=True) == 3
    assert "has no audio tower" in caplog.text
    assert fetch(redis_conn, job.id).get_status() == "queued"


def test_the_worker_finishes_its_warm_up_before_taking_its_first_job(redis_url, redis_conn, s3_bucket,
                                                                      tiny_checkpoint, tmp_path):
    """Its S3 client built (0.1-0.3 s of Python) and its resident heap set aside from the collector (a full
    collection of it: 130-190 ms with every thread stopped): the first job's fetch paid both while the
    model had nothing to run, the start of every drain."""
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a.wav", Body=write_wav(tmp_path / "a.wav", make_tone(1.0)).read_bytes())
    job = enqueue(redis_conn, {"audio_uri": f"s3://{bucket}/a.wav", "max_new_tokens": 4})
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()),
                               s3_endpoint_url=client.meta.endpoint_url, s3_region="us-east-1")
    assert start_worker(settings, tmp_path / "worker.log", burst=True).wait(timeout=120) == 0
    assert fetch(redis_conn, job.id).get_status() == "finished"
    log = (tmp_path / "worker.log").read_text()
    assert log.index("storage warm-up: S3 client built in") < log.index(job.id)
    assert log.index("objects of the warmed-up worker set aside from garbage collection") < log.index(job.id)


def test_s3_settings_that_cannot_build_a_client_do_not_stop_the_worker(redis_url, redis_conn, s3_bucket,
                                                                       tiny_checkpoint, tmp_path, monkeypatch):
    """A profile that does not exist: the worker starts and says why, its file:// jobs run and each S3 job
    fails with the reason a person can act on."""
    (tmp_path / "aws-config").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-config"))
    client, bucket = s3_bucket
    local = enqueue(redis_conn, {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri(),
                                 "max_new_tokens": 4})
    remote = enqueue(redis_conn, {"audio_uri": f"s3://{bucket}/a.wav", "max_new_tokens": 4})
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()), s3_endpoint_url=client.meta.endpoint_url,
                               s3_region="us-east-1", s3_profile="audioq-no-such-profile")
    assert start_worker(settings, tmp_path / "worker.log", burst=True).wait(timeout=120) == 0
    assert fetch(redis_conn, local.id).get_status() == "finished"
    assert failure_code(fetch(redis_conn, remote.id)) == "access_denied"
    assert "audioq-no-such-profile" in fetch(redis_conn, remote.id).get_meta()[record.META_FAILURE]["message"]
    log = (tmp_path / "worker.log").read_text()
    assert "storage warm-up: no S3 client (" in log and "audioq-no-such-profile" in log


def test_credentials_that_hang_delay_the_workers_start_by_one_storage_attempt_at_most(
        redis_url, redis_conn, tiny_checkpoint, tmp_path, monkeypatch, procs):
    """A credential_process that never answers (or a silent metadata endpoint): the warm-up gives up after
    ``s3_attempt_timeout`` and the worker takes its jobs."""
    (tmp_path / "aws-config").write_text("[profile stuck]\ncredential_process = sleep 30\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-config"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    job = enqueue(redis_conn, {"audio_uri": write_wav(tmp_path / "a.wav", make_tone(1.0)).as_uri(),
                               "max_new_tokens": 4})
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()), s3_region="us-east-1", s3_profile="stuck",
                               s3_attempt_timeout=1.0)
    procs.append(start_worker(settings, tmp_path / "worker.log", burst=True))
    assert procs[0].wait(timeout=25) == 0
    assert fetch(redis_conn, job.id).get_status() == "finished"
    assert "did not finish building the S3 client within 1 s" in (tmp_path / "worker.log").read_text()
