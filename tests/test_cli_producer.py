"""The ``audioq`` command end to end: ``producer.cli.main([...])`` against real Redis and S3.

Jobs that run, run in the real audioq worker (``run_burst``) with the real engine on the
tiny random-weight checkpoint, on WAVs written here; failures come from real bad inputs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tone
from worker_fixtures import run_burst, worker_settings, write_wav

from producer import Client
from producer.cli import main
from producer.printable import printable


@pytest.fixture
def cli(redis_url, capsys, monkeypatch):
    """Run ``audioq ARGS`` and return (exit code, stdout, stderr)."""
    monkeypatch.delenv("AUDIOQ_CONFIG", raising=False)

    def run(*args: str):
        code = main(["--redis-url", redis_url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def client(redis_url, redis_conn):
    return Client(worker_settings(redis_url), connection=redis_conn)


def run_jobs(client: Client, engine, capsys, *paths: Path) -> list[str]:
    """Enqueue the files, then run them in a real audioq worker (burst); its log output is dropped."""
    ids = [client.enqueue({"audio_uri": path.as_uri()}).job_id for path in paths]
    run_burst(client.settings, engine)
    capsys.readouterr()
    return ids


def test_enqueue_prints_the_job_id_and_is_idempotent(cli, client):
    code, out, err = cli("enqueue", "s3://audio/a.wav", "--language", "en", "--metadata", "speaker=ann",
                         "--metadata", "take=2", "--priority", "high")
    job_id = out.strip()
    assert code == 0 and job_id.startswith("aq-") and err == ""
    status = client.status(job_id)
    assert status.queue == "high" and status.request.metadata == {"speaker": "ann", "take": "2"}
    code, out, err = cli("enqueue", "s3://audio/a.wav", "--language", "en", "--metadata", "speaker=ann",
                         "--metadata", "take=2", "--priority", "high", "--json")
    assert code == 0 and json.loads(out) == [{"job_id": job_id, "created": False, "queue": "high",
                                              "outcome": "exists"}]
    assert "1 already existed" in err


def test_enqueue_with_explicit_job_id_and_task(cli, client):
    code, out, _ = cli("enqueue", "s3://audio/a.wav", "--job-id", "ep-12", "--task", "translate",
                       "--target-language", "de", "--max-new-tokens", "64")
    assert (code, out.strip()) == (0, "ep-12")
    assert client.status("ep-12").request.target_language == "de"


def test_enqueue_invalid_request_is_one_line_error(cli, redis_conn):
    code, out, err = cli("enqueue", "s3://audio/a.wav", "--task", "prompt")
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "needs prompt" in err and "Traceback" not in err
    code, _, err = cli("enqueue", "s3://audio/a.wav", "--job-id", "bad/id")
    assert code == 3 and "job id" in err
    assert redis_conn.dbsize() == 0


def test_enqueue_manifest_and_its_errors(cli, client, redis_conn, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_uri": "s3://audio/a.wav"}\n{"audio_uri": "ftp://x/y"}\n')
    code, out, err = cli("enqueue", "--manifest", str(bad))
    assert code == 3 and out == "" and "line 2" in err and redis_conn.dbsize() == 0

    good = tmp_path / "good.csv"
    good.write_text("audio_uri,language\ns3://audio/a.wav,en\ns3://audio/b.wav,fr\n")
    code, out, err = cli("enqueue", "--manifest", str(good), "--priority", "low")
    ids = out.split()
    assert code == 0 and len(ids) == 2 and "2 enqueued, 0 already existed" in err
    assert [s.queue for s in client.status_many(ids)] == ["low", "low"]
    code, _, err = cli("enqueue", "--manifest", str(tmp_path / "missing.jsonl"))
    assert code == 3 and "missing.jsonl" in err


def test_enqueue_prefix(cli, s3_bucket):
    s3, bucket = s3_bucket
    for key in ("in/a.wav", "in/b.mp3", "in/readme.md"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    code, out, _ = cli("enqueue", "--prefix", f"s3://{bucket}/in/", "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, _, err = cli("enqueue", "--prefix", f"s3://{bucket}/empty/")
    assert code == 3 and "no audio objects" in err
    code, _, err = cli("enqueue", "--prefix", "s3://no-such-bucket-here/in/")
    assert (code, err) == (3, "audioq: cannot list s3://no-such-bucket-here/in/: bucket 'no-such-bucket-here' "
                              "does not exist\n")


def test_enqueue_progress_line_only_on_a_terminal(cli, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"audio_uri": "s3://audio/{i}.wav"}}\n' for i in range(20)))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli("enqueue", "--manifest", str(manifest))[0] == 0
    assert "\renqueue [" in terminal.getvalue() and "20/20" in terminal.getvalue()


def test_status_text_and_json(cli, client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    code, out, _ = cli("status", job_id)
    assert code == 0 and out.split()[:4] == [job_id, "queued", "default", "position"]
    code, out, err = cli("status", job_id, "aq-missing", "--json")
    docs = json.loads(out)
    assert code == 1 and [d["state"] for d in docs] == ["queued", "not_found"]
    assert "unknown job aq-missing" in err


def test_list_and_info(cli, client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    code, out, _ = cli("list", "--state", "queued")
    assert code == 0 and out.split() == [job_id, "queued", "default", "s3://audio/a.wav"]
    assert [d["id"] for d in json.loads(cli("list", "--json")[1])] == [job_id]
    code, out, _ = cli("info", "--json")
    assert code == 0 and {q["name"]: q["queued"] for q in json.loads(out)["queues"]}["default"] == 1
    code, out, _ = cli("info")
    assert code == 0 and out.splitlines()[2].split()[:2] == ["default", "1"] and "0 worker(s)" in out


# ------------------------------------------------------------------ records that cannot be read
def unreadable_records(redis_conn, client) -> dict[str, str]:
    """One record of each unreadable kind beside a good one; returns id → what its reason says."""
    good = client.enqueue({"audio_uri": "s3://audio/good.wav"}).job_id
    redis_conn.set("rq:job:not-a-hash", "a string")
    redis_conn.rpush("rq:queue:default", "not-a-hash")
    garbled = client.enqueue({"audio_uri": "s3://audio/garbled.wav"}).job_id
    redis_conn.hset(f"rq:job:{garbled}", "status", "no-such-status")
    pickled = client.enqueue({"audio_uri": "s3://audio/pickled.wav"}).job_id
    redis_conn.hset(f"rq:job:{pickled}", "status", "finished")
    redis_conn.zadd("rq:finished:default", {pickled: 1, "bad id!": 1})
    redis_conn.xadd(f"rq:results:{pickled}", {"type": 1, "created_at": 0, "worker_name": "w",
                                               "return_value": base64.b64encode(pickle.dumps({"text": "hi"}))})
    return {good: "s3://audio/good.wav", "not-a-hash": "another Redis type", garbled: "no-such-status",
            pickled: "latest result cannot be read", "bad id!": "Job ID must only contain"}


def test_list_shows_each_unreadable_record_with_its_reason_and_the_rest(cli, client, redis_conn):
    expected = unreadable_records(redis_conn, client)
    code, out, _ = cli("list")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert code == 0 and set(lines) == set(expected), out
    for job_id, says in expected.items():
        assert says in lines[job_id] and ("unreadable" in lines[job_id]) == (not says.startswith("s3://"))
    docs = {d["id"]: d for d in json.loads(cli("list", "--json")[1])}
    assert docs["not-a-hash"]["state"] == "unreadable" and "Redis type" in docs["not-a-hash"]["reason"]


def test_status_and_results_show_unreadable_records_and_exit_1(cli, client, redis_conn):
    expected = unreadable_records(redis_conn, client)
    good, *bad = [job_id for job_id in expected if job_id != "bad id!"]
    code, out, _ = cli("status", good, *bad)
    assert code == 1 and out.splitlines()[0].split()[:2] == [good, "queued"]
    for line, job_id in zip(out.splitlines()[1:], bad):
        assert line.startswith(f"{job_id}  unreadable") and expected[job_id] in line
    code, _, err = cli("results", *bad)
    assert code == 1 and all(f"{job_id}: unreadable: " in err for job_id in bad)
    docs = json.loads(cli("results", *bad, "--json")[1])
    assert [d["state"] for d in docs] == ["unreadable"] * len(bad) and all(d["reason"] for d in docs)


def test_wait_ends_on_an_unreadable_record(cli, client, redis_conn):
    unreadable_records(redis_conn, client)
    code, out, _ = cli("wait", "not-a-hash", "--timeout", "5")
    assert code == 1 and "unreadable" in out


# ------------------------------------------------------------------ hostile text is printed escaped
FORGED = "s3://audio/a.wav\nfake-job  finished  default  all good\x1b[2J\u2028.wav"


def test_uris_with_newlines_and_escape_codes_print_escaped_on_one_line(cli, client, engine, capsys,
                                                                       monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    job_id = client.enqueue({"audio_uri": FORGED}).job_id
    code, out, _ = cli("list")
    assert code == 0 and out.count("\n") == 1 and "\x1b" not in out and "\\x1b[2J" in out
    with caplog.at_level(logging.INFO):
        run_burst(client.settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9",
                                                     "storage_retries": 0}), engine)
    capsys.readouterr()
    assert any(job_id in r.getMessage() for r in caplog.records)
    assert not any("\n" in r.getMessage() or "\x1b" in r.getMessage() for r in caplog.records)  # the worker log
    for verb in ("status", "results"):
        code, out, err = cli(verb, job_id)
        text = out + err
        assert code == 1 and text.count("\n") == 1 and "\x1b" not in text and "\u2028" not in text, text
        assert "storage_unavailable" in text and "\\nfake-job" in text


def test_results_wait_and_exit_codes(cli, client, engine, capsys, tmp_path):
    done, failed = run_jobs(client, engine, capsys, write_wav(tmp_path / "a.wav", make_tone(1.0)),
                            tmp_path / "missing.wav")
    text = client.status(done).result.text
    assert cli("results", done) == (0, printable(text, keep="\n\t") + "\n", "")  # control characters escaped
    code, out, _ = cli("results", done, failed, "--format", "json")
    docs = json.loads(out)
    assert code == 1 and docs[0]["result"]["text"] == text and docs[0]["result"]["audio_seconds"] == 1.0
    assert docs[1]["failure"]["code"] == "audio_not_found"
    code, _, err = cli("results", failed)
    message = client.status(failed).failure.message
    assert code == 1 and f"{failed}: failed: audio_not_found: {message}" in err and "no such file" in message
    assert cli("wait", done, "--timeout", "5")[0] == 0
    code, out, _ = cli("wait", done, failed, "--json", "--poll", "0.05")
    assert code == 1 and [d["state"] for d in json.loads(out)] == ["finished", "failed"]


def test_wait_timeout_exits_2(cli, client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    code, out, err = cli("wait", job_id, "--timeout", "0.2", "--poll", "0.05")
    assert code == 2 and "queued" in out and "timed out" in err


def test_cancel_then_requeue(cli, client):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    code, out, _ = cli("cancel", job_id)
    assert code == 0 and out.split()[:2] == [job_id, "canceled"]
    assert json.loads(cli("status", job_id, "--json")[1])[0]["failure"]["code"] == "canceled"
    code, out, _ = cli("requeue", job_id, "--json")
    assert code == 0 and json.loads(out)[0]["action"] == "requeued"
    assert cli("cancel", "aq-missing")[0] == 1


def test_requeue_all_failed(cli, client, engine, capsys, tmp_path):
    late = tmp_path / "late.wav"
    [failed] = run_jobs(client, engine, capsys, late)
    assert client.status(failed).failure.code == "audio_not_found"
    code, out, _ = cli("requeue", "--all-failed")
    assert code == 0 and out.split()[:2] == [failed, "requeued"]
    assert cli("requeue")[0] == 2  # bad usage
    write_wav(late, make_tone(1.0))  # the missing file arrives: the requeued job now runs through
    run_burst(client.settings, engine)
    capsys.readouterr()
    code, out, _ = cli("wait", failed, "--json", "--timeout", "5")
    assert code == 0 and json.loads(out)[0]["state"] == "finished"


def test_usage_errors_return_2(capsys):
    assert main(["enqueue", "s3://audio/a.wav", "--priority", "urgent"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["wait", "aq-x", "--poll", "0"], "--poll: must be a number of seconds > 0, not 0"),
    (["wait", "aq-x", "--poll", "-1"], "--poll: must be a number of seconds > 0, not -1"),
    (["wait", "aq-x", "--poll", "nan"], "--poll: must be a number of seconds > 0, not nan"),
    (["wait", "aq-x", "--timeout", "-5"], "--timeout: must be a number of seconds >= 0, not -5"),
    (["list", "--offset", "-1"], "--offset: must be a whole number >= 0, not -1"),
    (["list", "--limit", "0"], "--limit: must be a whole number >= 1, not 0"),
])
def test_out_of_range_numbers_are_usage_errors(args, message, capsys):
    """Before: --poll 0 busy-looped on Redis, --offset -1 sliced from the end of the page."""
    assert main(args) == 2  # refused before Redis is reached: no --redis-url needed
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["enqueue"], "give exactly one of"),
    (["enqueue", "s3://audio/a.wav", "--manifest", "m.jsonl"], "give exactly one of"),
    (["enqueue", "--manifest", "m.jsonl", "--job-id", "x"], "--job-id only goes with a single audio URI"),
    (["enqueue", "s3://audio/a.wav", "--all"], "--all only goes with --prefix"),
    (["enqueue", "--manifest", "m.jsonl", "--language", "en"], "request flags do not apply to --manifest"),
    (["enqueue", "s3://audio/a.wav", "--metadata", "novalue"], "expected KEY=VALUE"),
    (["requeue"], "give job ids or --all-failed"),
    (["requeue", "aq-x", "--all-failed"], "give job ids or --all-failed"),
    (["requeue", "aq-x", "--queue", "low"], "--queue only goes with --all-failed"),
])
def test_options_that_do_not_go_together_exit_2(cli, redis_conn, args, message):
    code, out, err = cli(*args)
    assert (code, out) == (2, "") and err.startswith("audioq: ") and message in err
    assert err.count("\n") == 1
    assert redis_conn.dbsize() == 0


def test_exit_codes_of_every_job_verb(cli, client, engine, capsys, tmp_path):
    """0 ok, 1 a job failed / was canceled / is unknown, whatever the verb that names jobs."""
    done, failed = run_jobs(client, engine, capsys, write_wav(tmp_path / "a.wav", make_tone(1.0)),
                            tmp_path / "missing.wav")
    queued = client.enqueue({"audio_uri": "s3://audio/q.wav"}).job_id
    canceled = client.enqueue({"audio_uri": "s3://audio/c.wav"}).job_id
    client.cancel(canceled)
    assert [cli("status", job_id)[0] for job_id in (done, queued, failed, canceled, "aq-missing")] == [0, 0, 1, 1, 1]
    assert cli("status", done, queued)[0] == 0 and cli("status", done, failed)[0] == 1
    assert [cli("results", job_id)[0] for job_id in (done, queued, failed, canceled, "aq-missing")] == [0, 1, 1, 1, 1]
    assert [cli("wait", job_id, "--timeout", "5")[0] for job_id in (done, failed, canceled, "aq-missing")] == \
        [0, 1, 1, 1]
    assert cli("wait", queued, "--timeout", "0")[0] == 2
    assert [cli("cancel", job_id)[0] for job_id in (done, "aq-missing")] == [0, 1]
    assert [cli("requeue", job_id)[0] for job_id in (done, "aq-missing")] == [0, 1]
    assert cli("list")[0] == 0 and cli("info")[0] == 0


def test_worker_and_transcribe_that_cannot_load_a_model_exit_3(cli, monkeypatch, tmp_path):
    """``run_worker``/``run_transcribe`` say "could not run" with 2; the CLI's code for it is 3."""
    monkeypatch.delenv("AUDIOQ_MODEL", raising=False)
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    wav = write_wav(tmp_path / "a.wav", make_tone(0.5))
    assert cli("worker", "--burst")[0] == 3  # no model configured
    assert cli("worker", "--burst", "--model", str(empty))[0] == 3
    assert cli("transcribe", str(wav))[0] == 3
    assert cli("transcribe", str(wav), "--model", str(empty))[0] == 3


def test_callee_codes_map_onto_the_cli_convention():
    from producer.cli import _callee_code

    assert [_callee_code(rc) for rc in (None, 0, 1, 2, 3, 70)] == [0, 0, 1, 3, 3, 3]


def test_inconsistent_settings_are_one_line_exit_3(cli, monkeypatch):
    monkeypatch.setenv("AUDIOQ_DEFAULT_QUEUE", "normal")
    code, out, err = cli("info")
    assert (code, out) == (3, "") and err.count("\n") == 1
    assert err.startswith("audioq: invalid settings: default_queue 'normal' is not one of queues "
                          "(high, default, low): no worker would read it")


def test_unknown_audioq_variable_is_warned_about_on_stderr(redis_url):
    """A real ``audioq`` process (no test logging set up): a misspelt variable gets one line."""
    env = dict(os.environ, AUDIOQ_QUEUS="high,low", AUDIOQ_DEBUG="", AUDIOQ_TEST_ANYTHING="1")
    env.pop("AUDIOQ_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "producer", "--redis-url", redis_url, "info", "--json"],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("audioq: ignoring unknown environment variable AUDIOQ_QUEUS "
                           "(did you mean AUDIOQ_QUEUES?)\n")
    assert [q["name"] for q in json.loads(done.stdout)["queues"]] == ["high", "default", "low"]


def test_unreachable_redis_is_one_line(capsys):
    code = main(["--redis-url", "redis://:secret@127.0.0.1:1/0", "status", "aq-x"])
    _, err = capsys.readouterr()
    assert code == 3 and err.startswith("audioq: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert err.count("\n") == 1 and "secret" not in err


def test_global_options_work_after_the_command(redis_url, client, capsys):
    job_id = client.enqueue({"audio_uri": "s3://audio/a.wav"}).job_id
    assert main(["status", job_id, "--redis-url", redis_url]) == 0
    assert job_id in capsys.readouterr().out


def test_producer_imports_no_mlx_numpy_or_worker(redis_url):
    code = (
        "import sys\n"
        "import producer, producer.cli, producer.client, producer.manifest, producer.status\n"
        "from producer import Client\n"
        f"rc = producer.cli.main(['--redis-url', {redis_url!r}, 'info', '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'numpy', 'worker'))\n"
        "print(heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy or rc else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("raw, shown", [
    ("plain text, é, 日本語", "plain text, é, 日本語"),
    ("a\nb\r\tc", "a\\nb\\r\\tc"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("next\x85line\u2028sep\u202eflip", "next\\x85line\\u2028sep\\u202eflip"),
])
def test_printable_escapes_what_would_move_or_restyle_the_screen(raw, shown):
    from producer.printable import printable

    assert printable(raw) == shown
    assert printable("line 1\nline 2\x1b", keep="\n") == "line 1\nline 2\\x1b"
