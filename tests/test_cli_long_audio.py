"""Long audio from the command line: ``results --format``, ``enqueue --output-format``, ``wait``'s
bar by chunk, and ``transcribe`` on the worker's own path (same segments as a queued job).

Real Redis, the real worker (``run_burst``) and engine on the tiny checkpoint, espeak-ng speech.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading

import pytest
import srt
import webvtt
from recordings import speech_with_pauses
from test_cli_producer import cli  # noqa: F401
from worker_fixtures import run_burst, worker_settings, write_wav

from producer import Client
from producer.cli import main
from producer.schema import JobResult
from worker.gemma4.engine import Engine

CHUNK = {"max_chunk_seconds": 8.0, "min_chunk_seconds": 3.0}
CHUNK_ENV = {"AUDIOQ_MAX_CHUNK_SECONDS": "8", "AUDIOQ_MIN_CHUNK_SECONDS": "3"}


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    samples = speech_with_pauses([0.7, 4.0, 0.7, 0.7, 6.0, 0.7, 0.7, 0.7]).samples  # 8 chunks under CHUNK
    return write_wav(tmp_path_factory.mktemp("talk") / "talk.wav", samples, subtype="FLOAT")


@pytest.fixture
def client(redis_url, redis_conn):
    return Client(worker_settings(redis_url, **CHUNK), connection=redis_conn)


def finished_job(client, engine, capsys, request: dict) -> str:
    job_id = client.enqueue(request).job_id
    run_burst(client.settings, engine)
    capsys.readouterr()
    return job_id


def test_results_render_a_long_job_as_subtitles(cli, client, engine, capsys, talk):
    job_id = finished_job(client, engine, capsys, {"audio_uri": talk.as_uri(), "max_new_tokens": 3})
    result = client.status(job_id).result
    spoken = [s for s in result.segments if s.text.split()]
    code, out, _ = cli("results", job_id, "--format", "srt")
    cues = list(srt.parse(out))
    assert code == 0 and cues[0].index == 1 and cues[0].start.total_seconds() == spoken[0].start
    code, out, _ = cli("results", job_id, "--format", "vtt")
    assert code == 0 and out.startswith("WEBVTT") and len(webvtt.from_buffer(io.StringIO(out))) >= len(spoken)
    assert cli("results", job_id, "--format", "txt")[1] == cli("results", job_id, "--format", "text")[1] \
        == result.text + "\n"


def test_enqueue_names_the_formats_the_worker_writes(cli, client):
    code, out, _ = cli("enqueue", "s3://audio/a.wav", "--output-uri", "s3://audio/out/", "--output-format", "srt",
                       "--output-format", "vtt")
    assert code == 0 and client.status(out.strip()).request.output_formats == ["srt", "vtt"]
    code, _, err = cli("enqueue", "s3://audio/b.wav", "--output-format", "docx")
    assert code == 2 and "invalid choice" in err


def test_a_csv_manifest_names_output_formats_in_one_cell(cli, client, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text('audio_uri,output_uri,output_formats\ns3://audio/a.wav,s3://audio/out/,"srt, vtt"\n'
                        "s3://audio/b.wav,s3://audio/out/,txt json srt\n")
    code, out, _ = cli("enqueue", "--manifest", str(manifest))
    assert code == 0
    assert [client.status(i).request.output_formats for i in out.split()] == [["srt", "vtt"], ["txt", "json", "srt"]]


def test_wait_advances_its_bar_by_chunk(redis_url, client, engine, talk, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    job_id = client.enqueue({"audio_uri": talk.as_uri(), "max_new_tokens": 40}).job_id
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    codes = []
    waiter = threading.Thread(target=lambda: codes.append(
        main(["--redis-url", redis_url, "wait", job_id, "--poll", "0.05"])))
    waiter.start()
    # Two rows at a time, so the 8 chunks finish at different steps (a 32-row batch finishes them together).
    run_burst(client.settings, Engine(engine.model, max_rows=2))
    waiter.join(30)
    assert codes == [0]
    shown = terminal.getvalue()
    counts = {int(part.split("/")[0]) for part in shown.split() if part.endswith("/8")}
    assert len(counts - {0, 8}) >= 2 and 8 in counts  # it moved chunk by chunk, and ended full


def test_transcribe_takes_the_workers_path_and_renders_formats(cli, client, engine, capsys, tiny_checkpoint, talk,
                                                               tmp_path, monkeypatch):
    for name, value in CHUNK_ENV.items():
        monkeypatch.setenv(name, value)
    job_id = finished_job(client, engine, capsys, {"audio_uri": talk.as_uri(), "max_new_tokens": 3})
    queued = client.status(job_id).result
    model = str(tiny_checkpoint())
    code, out, _ = cli("transcribe", str(talk), "--model", model, "--max-new-tokens", "3", "--json")
    local = JobResult.model_validate(json.loads(out))
    assert code == 0 and local.segments == queued.segments and local.chunks == 8
    assert (local.text, local.tokens, local.speech_seconds) == (queued.text, queued.tokens, queued.speech_seconds)
    code, out, _ = cli("transcribe", str(talk), "--model", model, "--max-new-tokens", "3", "--format", "srt")
    assert code == 0 and [c.content for c in srt.parse(out)] == [c.content for c in srt.parse(
        cli("results", job_id, "--format", "srt")[1])]
    code, out, _ = cli("transcribe", str(talk), "--model", model, "--max-new-tokens", "3", "--format", "vtt",
                       "--output-dir", str(tmp_path / "subs"))
    assert code == 0 and out.strip() == str(tmp_path / "subs" / "talk.vtt")
    assert (tmp_path / "subs" / "talk.vtt").read_text().startswith("WEBVTT")
