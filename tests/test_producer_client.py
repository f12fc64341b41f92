"""Producer enqueue paths: one job, many jobs, manifests, S3 prefixes. Real Redis, real S3 (moto).

Jobs that run, run in the real audioq worker (``run_burst``) with the real engine on the
tiny random-weight checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from conftest import make_tone
from pydantic import ValidationError
from rq.job import Job, Retry
from worker_fixtures import closed_endpoint, run_burst, worker_settings, write_wav

from producer import Client, record
from producer.manifest import EnqueueItem, ManifestError
from producer.s3 import StorageError, s3_client, split_s3_uri
from producer.schema import JobRequest
from producer.settings import Settings, load_settings


@pytest.fixture
def client(redis_url, redis_conn):
    return Client(load_settings(redis_url=redis_url, environ={}), connection=redis_conn)


def queued_ids(redis_conn, name="default") -> list[str]:
    return [v.decode() for v in redis_conn.lrange(f"rq:queue:{name}", 0, -1)]


# ------------------------------------------------------------------ single enqueue
def test_same_request_twice_is_one_job_queued_once(client, redis_conn):
    first = client.enqueue({"audio_uri": "s3://audio/a.wav"})
    second = client.enqueue(JobRequest(audio_uri="s3://audio/a.wav"))
    assert first.created and not second.created
    assert first.job_id == second.job_id == JobRequest(audio_uri="s3://audio/a.wav").derived_job_id()
    assert queued_ids(redis_conn) == [first.job_id]


def test_job_record_follows_the_contract(client):
    request = JobRequest(audio_uri="s3://audio/a.wav", language="de", metadata={"batch": 7})
    outcome = client.enqueue(request)
    job = Job.fetch(outcome.job_id, connection=client.connection, serializer=record.SERIALIZER)
    assert job.func_name == record.TASK_FUNC
    assert job.args == [request.model_dump(mode="json")]
    assert job.meta[record.META_REQUEST] == request.model_dump(mode="json")
    assert job.result_ttl == client.settings.result_ttl and job.failure_ttl == client.settings.failure_ttl
    s = client.settings
    assert job.timeout > s.job_timeout_base + s.job_timeout_per_audio_second * s.max_audio_seconds


def test_explicit_job_id_is_used_and_validated(client):
    assert client.enqueue({"audio_uri": "s3://audio/a.wav"}, job_id="my-job_1").job_id == "my-job_1"
    for bad in ("audio/a.wav", "a:b", "", "x" * 129):
        with pytest.raises(ValueError):
            client.enqueue({"audio_uri": "s3://audio/a.wav"}, job_id=bad)


def test_invalid_request_is_refused_before_redis(client, redis_conn):
    with pytest.raises(ValueError):
        client.enqueue({"audio_uri": "s3://audio/a.wav", "task": "translate"})
    assert redis_conn.dbsize() == 0


@pytest.mark.parametrize("fields, says", [
    ({"task": "prompt", "prompt": "x" * 4001}, "prompt is 4001 characters; at most 4000 are allowed (max_prompt_chars)"),
    ({"language": "x" * 65}, "language is 65 characters; at most 64"),
    ({"task": "translate", "target_language": "x" * 65}, "target_language is 65 characters"),
    ({"max_new_tokens": True}, "not true or false"),
    ({"metadata": {"blob": "x" * 70_000}}, "bytes as JSON, metadata included; at most 65536 are allowed"),
])
def test_oversized_text_and_boolean_numbers_are_refused_before_redis(client, redis_conn, fields, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        client.enqueue({"audio_uri": "s3://audio/a.wav", **fields})
    with pytest.raises(ManifestError, match=re.escape(says)):
        client.enqueue_many([{"audio_uri": "s3://audio/a.wav", **fields}])
    assert redis_conn.dbsize() == 0


def test_request_limits_are_settings(redis_url, redis_conn):
    client = Client(Settings(redis_url=redis_url, max_prompt_chars=5), connection=redis_conn)
    with pytest.raises(ValueError, match="at most 5 are allowed"):
        client.enqueue({"audio_uri": "s3://audio/a.wav", "task": "prompt", "prompt": "longer"})
    assert client.enqueue({"audio_uri": "s3://audio/a.wav", "task": "prompt", "prompt": "short"}).created


@pytest.mark.parametrize("priority, queue", [("high", "high"), ("default", "default"), ("low", "low")])
def test_priority_lands_in_its_queue(client, redis_conn, priority, queue):
    outcome = client.enqueue({"audio_uri": "s3://audio/a.wav"}, priority=priority)
    assert outcome.queue == queue
    assert queued_ids(redis_conn, queue) == [outcome.job_id]


def test_priorities_follow_the_configured_queue_order(redis_url, redis_conn):
    settings = load_settings(redis_url=redis_url, environ={}, queues=["urgent", "normal", "bulk"],
                             default_queue="normal")
    client = Client(settings, connection=redis_conn)
    assert [client.queue_name(priority=p) for p in ("high", "default", "low")] == ["urgent", "normal", "bulk"]
    with pytest.raises(ValueError):
        client.queue_name(queue="high")


# -------------------------------------------------------------------- bulk enqueue
def test_enqueue_many_twice_stays_duplicate_free(client, redis_conn):
    requests = [{"audio_uri": f"s3://audio/{i:05d}.wav"} for i in range(3000)]
    progress = []
    started = time.perf_counter()
    first = client.enqueue_many(requests, on_progress=lambda done, total: progress.append((done, total)))
    elapsed = time.perf_counter() - started
    second = client.enqueue_many(requests)
    assert sum(o.created for o in first) == 3000
    assert not any(o.created for o in second)
    assert [o.job_id for o in first] == [o.job_id for o in second]
    ids = queued_ids(redis_conn)
    assert len(ids) == len(set(ids)) == 3000
    assert progress[-1] == (3000, 3000)
    assert elapsed < 20, f"3000 jobs took {elapsed:.1f} s"


def test_enqueue_many_and_enqueue_agree_on_existence(client, redis_conn):
    single = client.enqueue({"audio_uri": "s3://audio/0.wav"})
    outcomes = client.enqueue_many([{"audio_uri": "s3://audio/0.wav"}, {"audio_uri": "s3://audio/1.wav"},
                                    {"audio_uri": "s3://audio/1.wav"}])
    assert [o.created for o in outcomes] == [False, True, False]
    assert outcomes[0].job_id == single.job_id
    assert not client.enqueue({"audio_uri": "s3://audio/1.wav"}).created
    assert len(queued_ids(redis_conn)) == 2


def test_enqueue_many_items_carry_their_own_id_and_priority(client, redis_conn):
    outcomes = client.enqueue_many([
        {"audio_uri": "s3://audio/a.wav", "job_id": "job-a", "priority": "high"},
        EnqueueItem(request=JobRequest(audio_uri="s3://audio/b.wav"), priority="low"),
        JobRequest(audio_uri="s3://audio/c.wav"),
    ])
    assert [(o.job_id, o.queue) for o in outcomes][0] == ("job-a", "high")
    assert [o.queue for o in outcomes] == ["high", "low", "default"]
    assert queued_ids(redis_conn, "high") == ["job-a"]


def test_enqueue_many_with_one_bad_item_enqueues_nothing(client, redis_conn):
    with pytest.raises(ManifestError) as caught:
        client.enqueue_many([{"audio_uri": "s3://audio/a.wav"}, {"audio_uri": "http://x/y.wav"}])
    assert caught.value.problems[0][0] == 2 and "item 2" in str(caught.value)
    assert redis_conn.dbsize() == 0


def test_bulk_enqueued_job_runs_like_a_single_one(redis_url, redis_conn, engine, tmp_path):
    settings = worker_settings(redis_url)
    client = Client(settings, connection=redis_conn)
    clip = make_tone(1.0)
    single = client.enqueue({"audio_uri": write_wav(tmp_path / "single.wav", clip).as_uri()})
    [bulk] = client.enqueue_many([{"audio_uri": write_wav(tmp_path / "bulk.wav", clip).as_uri()}])
    assert redis_conn.sismember("rq:queues", "rq:queue:default")
    a, b = (Job.fetch(o.job_id, connection=redis_conn, serializer="json") for o in (single, bulk))
    def shape(job: Job) -> tuple:
        return (job.func_name, job.timeout, job.result_ttl, job.failure_ttl, job.origin,
                job.get_status(refresh=False), sorted(job.meta), job.args[0].keys())

    assert shape(a) == shape(b) and a.func_name == record.TASK_FUNC
    run_burst(settings, engine)
    results = [client.status(o.job_id) for o in (single, bulk)]
    assert [s.state for s in results] == ["finished", "finished"], [s.failure for s in results]
    one, many = (s.result for s in results)
    # The same audio through the same worker: the same (deterministic) generation.
    assert (many.text, many.tokens, many.audio_seconds, many.audio_tokens) == \
        (one.text, one.tokens, one.audio_seconds, one.audio_tokens)
    assert many.tokens >= 1 and many.audio_seconds == 1.0


# ----------------------------------------------------------------------- manifests
def test_jsonl_manifest_enqueues_every_row(client, redis_conn, tmp_path):
    path = tmp_path / "batch.jsonl"
    rows = [{"audio_uri": "s3://audio/a.wav"},
            {"audio_uri": "s3://audio/b.wav", "task": "translate", "target_language": "en", "job_id": "b-1"},
            {"audio_uri": "s3://audio/c.wav", "priority": "low", "metadata": {"speaker": "x"}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    outcomes = client.enqueue_manifest(str(path))
    assert [o.created for o in outcomes] == [True, True, True]
    assert outcomes[1].job_id == "b-1" and outcomes[2].queue == "low"
    assert not any(o.created for o in client.enqueue_manifest(str(path)))


def test_csv_manifest_reads_metadata_columns(client, tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text("audio_uri,task,max_new_tokens,metadata,metadata.speaker,priority\n"
                    's3://audio/a.wav,transcribe,128,"{""batch"": 3}",alice,high\n'
                    "s3://audio/b.wav,,,,,\n")
    a, b = client.enqueue_manifest(str(path))
    status = client.status(a.job_id)
    assert a.queue == "high" and b.queue == "default"
    assert status.request.max_new_tokens == 128
    assert status.request.metadata == {"batch": 3, "speaker": "alice"}


def test_jsonl_manifest_with_bad_rows_enqueues_nothing_and_names_lines(client, redis_conn, tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text('{"audio_uri": "s3://audio/a.wav"}\n'
                    '{"audio_uri": "s3://audio/b.wav", "task": "prompt"}\n'
                    "not json\n"
                    '{"audio_uri": "s3://audio/c.wav", "bogus": 1}\n')
    with pytest.raises(ManifestError) as caught:
        client.enqueue_manifest(str(path))
    assert [n for n, _ in caught.value.problems] == [2, 3, 4]
    assert "line 2" in str(caught.value) and "bogus" in str(caught.value)
    assert redis_conn.dbsize() == 0


def test_a_manifest_row_over_a_limit_is_named_by_its_line(client, redis_conn, tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text('{"audio_uri": "s3://audio/a.wav"}\n\n'
                    + json.dumps({"audio_uri": "s3://audio/b.wav", "task": "prompt", "prompt": "x" * 10**6}) + "\n")
    with pytest.raises(ManifestError) as caught:
        client.enqueue_manifest(str(path))
    assert caught.value.problems == [(3, "prompt is 1000000 characters; at most 4000 are allowed (max_prompt_chars)")]
    assert redis_conn.dbsize() == 0


def test_a_raw_line_separator_inside_a_jsonl_string_is_part_of_the_row(client, tmp_path):
    path = tmp_path / "batch.jsonl"
    prompt = "first part\u2028second part\u2029third\x85fourth"
    path.write_text(json.dumps({"audio_uri": "s3://audio/a.wav", "task": "prompt", "prompt": prompt},
                               ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # raw, not escaped
    (outcome,) = client.enqueue_manifest(str(path))
    assert client.status(outcome.job_id).request.prompt == prompt


def test_a_raw_line_separator_inside_a_csv_cell_is_part_of_the_cell(client, tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text("audio_uri,task,prompt\ns3://audio/a.wav,prompt,one\u2028two\n", encoding="utf-8")
    (outcome,) = client.enqueue_manifest(str(path))
    assert client.status(outcome.job_id).request.prompt == "one\u2028two"


def test_csv_manifest_with_bad_row_names_its_line(client, redis_conn, tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text("audio_uri,priority\ns3://audio/a.wav,high\ns3://audio/b.wav,urgent\n")
    with pytest.raises(ManifestError) as caught:
        client.enqueue_manifest(str(path))
    assert caught.value.problems[0][0] == 3 and "urgent" in caught.value.problems[0][1]
    assert redis_conn.dbsize() == 0


def test_manifest_reusing_an_explicit_job_id_is_invalid(client, tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text('{"audio_uri": "s3://audio/a.wav", "job_id": "x"}\n'
                    '{"audio_uri": "s3://audio/b.wav", "job_id": "x"}\n')
    with pytest.raises(ManifestError, match="already used on line 1"):
        client.enqueue_manifest(str(path))


# ----------------------------------------------------------------------- S3 prefix
def test_prefix_enqueues_audio_objects_only(redis_url, redis_conn, s3_bucket):
    s3, bucket = s3_bucket
    for key in ("calls/a.wav", "calls/b.FLAC", "calls/sub/c.mp3", "calls/notes.txt", "calls/dir/", "other/d.wav"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    client = Client(load_settings(redis_url=redis_url), connection=redis_conn)
    outcomes = client.enqueue_prefix(f"s3://{bucket}/calls/", language="en")
    uris = sorted(client.status(o.job_id).request.audio_uri for o in outcomes)
    assert uris == [f"s3://{bucket}/calls/a.wav", f"s3://{bucket}/calls/b.FLAC", f"s3://{bucket}/calls/sub/c.mp3"]
    assert all(client.status(o.job_id).request.language == "en" for o in outcomes)
    assert not any(o.created for o in client.enqueue_prefix(f"s3://{bucket}/calls/", language="en"))
    everything = client.enqueue_prefix(f"s3://{bucket}/calls/", all_objects=True, language="en")
    assert [o.created for o in everything].count(True) == 1  # notes.txt; the "dir/" marker never


def test_prefix_with_a_text_field_over_its_limit_is_one_clear_error(redis_url, redis_conn, s3_bucket):
    s3, bucket = s3_bucket
    for key in ("a.wav", "b.wav"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    client = Client(load_settings(redis_url=redis_url), connection=redis_conn)
    with pytest.raises(ValueError) as caught:
        client.enqueue_prefix(f"s3://{bucket}/", language="x" * 100)
    assert str(caught.value) == ("invalid request: language is 100 characters; at most 64 are allowed "
                                 "(max_language_chars)")
    assert redis_conn.dbsize() == 0


def test_prefix_in_a_missing_bucket_is_a_plain_sentence(redis_url, redis_conn, s3_env):
    client = Client(load_settings(redis_url=redis_url), connection=redis_conn)
    with pytest.raises(StorageError) as caught:
        client.enqueue_prefix("s3://no-such-bucket-here/calls/")
    assert str(caught.value) == "cannot list s3://no-such-bucket-here/calls/: bucket 'no-such-bucket-here' does not exist"


def test_prefix_with_storage_down_is_a_plain_sentence(redis_url, redis_conn, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = Client(load_settings(redis_url=redis_url, s3_endpoint_url=closed_endpoint(), s3_region="us-east-1"),
                    connection=redis_conn)
    with pytest.raises(StorageError, match="cannot list s3://audio/x/: storage cannot be reached"):
        client.enqueue_prefix("s3://audio/x/")


def test_prefix_with_invalid_fields_is_one_clear_error(redis_url, redis_conn, s3_bucket):
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="a.wav", Body=b"x")
    client = Client(load_settings(redis_url=redis_url), connection=redis_conn)
    with pytest.raises(ValueError, match="target_language"):
        client.enqueue_prefix(f"s3://{bucket}/", task="translate")
    assert client.enqueue_prefix(f"s3://{bucket}/nothing-here/") == []


# ------------------------------------------------------------------------ settings
@pytest.mark.parametrize("values, message", [
    ({"queues": ["high", "low"]}, "default_queue 'default' is not one of queues (high, low): no worker would read it"),
    ({"queues": []}, "queues must name at least one queue"),
    ({"queues": ["high", "default", "high"]}, "queues lists high more than once"),
    ({"queues": ["high", " default"]}, "queue names must not be blank"),
    ({"storage_retry_backoff": [5.0, -1.0]}, "storage_retry_backoff must hold seconds >= 0, not [-1.0]"),
    ({"result_ttl": -1}, "result_ttl"),
    ({"failure_ttl": 0}, "failure_ttl"),
    ({"s3_read_timeout": 0}, "s3_read_timeout"),
    ({"heartbeat_interval": 15, "lost_after": 20}, "lost_after (20 s) must be at least twice heartbeat_interval (15 s)"),
    ({"default_max_new_tokens": 4096}, "default_max_new_tokens (4096) is above max_new_tokens_limit (2048)"),
])
def test_inconsistent_settings_are_refused_at_load(values, message):
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    assert message in str(caught.value)
    # The same through the environment, as a worker or the CLI loads them.
    environ = {f"AUDIOQ_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in values.items()}
    with pytest.raises(ValidationError, match=message.split(" (")[0].replace("[", r"\[")):
        load_settings(environ=environ)


def test_negative_backoff_is_what_rq_would_raise_on_inside_the_job():
    """Why the check matters: the worker hands storage_retry_backoff to RQ's Retry, which raises."""
    with pytest.raises(ValueError, match="negative"):
        Retry(max=3, interval=[5.0, -1.0])
    Retry(max=3, interval=Settings().storage_retry_backoff)  # the defaults are fine


def test_comma_separated_env_lists_are_trimmed(redis_url, redis_conn):
    settings = load_settings(redis_url=redis_url, environ={
        "AUDIOQ_QUEUES": "urgent, normal ,bulk,", "AUDIOQ_DEFAULT_QUEUE": "normal",
        "AUDIOQ_STORAGE_RETRY_BACKOFF": " 1, 2.5 "})
    assert settings.queues == ["urgent", "normal", "bulk"] and settings.storage_retry_backoff == [1.0, 2.5]
    client = Client(settings, connection=redis_conn)
    assert client.enqueue({"audio_uri": "s3://audio/a.wav"}, priority="low").queue == "bulk"
    assert load_settings(environ={"AUDIOQ_QUEUES": '["a", "b"]', "AUDIOQ_DEFAULT_QUEUE": "b"}).queues == ["a", "b"]


def test_unknown_audioq_environment_variables_are_warned_about(caplog):
    environ = {"AUDIOQ_QUEUE": "high", "AUDIOQ_REDIS_URL": "redis://x:6379/0", "AUDIOQ_CONFIG": "",
               "AUDIOQ_DEBUG": "1", "AUDIOQ_TEST_REDIS_URL": "redis://y", "AUDIOQ_FROBNICATE": "1", "HOME": "/"}
    with caplog.at_level(logging.WARNING, logger="audioq.settings"):
        settings = load_settings(environ=environ)
    assert settings.redis_url == "redis://x:6379/0"
    assert [r.getMessage() for r in caplog.records] == [
        "audioq: ignoring unknown environment variable AUDIOQ_FROBNICATE",
        "audioq: ignoring unknown environment variable AUDIOQ_QUEUE (did you mean AUDIOQ_QUEUES?)",
    ]


def test_unknown_toml_keys_are_still_errors(tmp_path):
    path = tmp_path / "audioq.toml"
    path.write_text('[queues]\nqueue = ["high"]\n')
    with pytest.raises(ValidationError, match="queue"):
        load_settings(path, environ={})


def test_the_shipped_configs_are_valid():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("producer.toml", "worker.toml"):
        assert load_settings(configs / name, environ={}) == Settings()  # they spell out the defaults


# ---------------------------------------------------------------------- S3 helpers
@pytest.mark.parametrize("uri, parts", [
    ("s3://audio/calls/a.wav", ("audio", "calls/a.wav")),
    ("s3://audio/calls/", ("audio", "calls/")),
    ("s3://audio", ("audio", "")),
    ("s3://audio/a#1?.wav", ("audio", "a#1?.wav")),  # urlparse would cut the key at # and ?
    ("s3://audio//lead", ("audio", "/lead")),
    ("S3://audio/x", ("audio", "x")),
])
def test_split_s3_uri(uri, parts):
    assert split_s3_uri(uri) == parts


@pytest.mark.parametrize("uri", ["file:///a.wav", "s3:/audio/x", "s3://ab/x", "s3:///x", "audio/x"])
def test_split_s3_uri_refuses_what_is_not_an_s3_uri(uri):
    with pytest.raises(ValueError):
        split_s3_uri(uri)


def test_s3_client_follows_the_settings(s3_bucket):
    s3, bucket = s3_bucket
    s3.put_object(Bucket=bucket, Key="a#1.wav", Body=b"x")
    settings = load_settings(s3_addressing_style="path", s3_connect_timeout=3, s3_read_timeout=7)
    client = s3_client(settings)
    config = client.meta.config
    assert client.meta.endpoint_url == settings.s3_endpoint_url and client.meta.region_name == "us-east-1"
    assert (config.connect_timeout, config.read_timeout, config.s3["addressing_style"]) == (3, 7, "path")
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}  # 1 request + 2 retries
    request = JobRequest(audio_uri=f"s3://{bucket}/a#1.wav")
    bucket_name, key = split_s3_uri(request.audio_uri)
    assert client.get_object(Bucket=bucket_name, Key=key)["Body"].read() == b"x"
