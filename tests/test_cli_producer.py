"""The ``audioq`` command end to end: ``producer.cli.main([...])`` against real Redis and S3.

Jobs that run, run in the real audioq worker (``run_burst``) with the real engine on the
tiny random-weight checkpoint, on WAVs written here; failures come from real bad inputs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tone
from worker_fixtures import run_burst, worker_settings, write_wav

from producer import Client
from producer.cli import main


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
    code, _, err = cli("enqueue")
    assert code == 3 and "exactly one" in err
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


def test_results_wait_and_exit_codes(cli, client, engine, capsys, tmp_path):
    done, failed = run_jobs(client, engine, capsys, write_wav(tmp_path / "a.wav", make_tone(1.0)),
                            tmp_path / "missing.wav")
    text = client.status(done).result.text
    assert cli("results", done) == (0, text + "\n", "")
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
    assert cli("requeue")[0] == 3
    write_wav(late, make_tone(1.0))  # the missing file arrives: the requeued job now runs through
    run_burst(client.settings, engine)
    capsys.readouterr()
    code, out, _ = cli("wait", failed, "--json", "--timeout", "5")
    assert code == 0 and json.loads(out)[0]["state"] == "finished"


def test_usage_errors_return_2(capsys):
    assert main(["enqueue", "s3://audio/a.wav", "--priority", "urgent"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


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
