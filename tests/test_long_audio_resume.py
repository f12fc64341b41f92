"""A long job's finished chunks are saved as they complete, and a later attempt resumes after them.

Proven with real faults: a worker subprocess SIGKILLed in the middle of a many-chunk job (the
other worker requeues it and finishes it), a job canceled mid-way and requeued, and an S3
server that stops while the chunks run (the output write fails and RQ retries the job). Which
chunks the second attempt runs is read from Redis itself (MONITOR sees every chunk saved),
and the final result must equal an uninterrupted run's. Liveness times are scaled down as in
test_worker_liveness.py.
"""

from __future__ import annotations

import shutil
import socket
import signal
import subprocess
import sys
import threading

import boto3
import pytest
from recordings import speech_with_pauses
from rq import SimpleWorker
from test_worker_liveness import procs, split_by_job  # noqa: F401
from worker_fixtures import enqueue, fetch, free_port, run_burst, start_worker, wait_for, worker_settings, write_wav

from producer import record
from producer.client import Client
from worker.recording import ChunkText

CHUNK = {"max_chunk_seconds": 8.0, "min_chunk_seconds": 3.0}
CHUNKS = 8  # the plan of the recording below under CHUNK
TOKENS = 200  # per chunk: long enough to act between chunks, at ~5-7 ms a token here
SAME = ("text", "segments", "chunks", "speech_seconds", "tokens", "audio_tokens", "audio_seconds")


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    samples = speech_with_pauses([0.7, 4.0, 0.7, 0.7, 6.0, 0.7, 0.7, 0.7]).samples
    return write_wav(tmp_path_factory.mktemp("talk") / "talk.wav", samples, subtype="FLOAT")


def saved(redis_conn, job_id: str) -> set[int]:
    return {int(i) for i in redis_conn.hkeys(record.chunks_key(job_id))}


class ChunkSaves:
    """Every chunk index saved for ``job_id`` from now on, as Redis MONITOR reports the HSETs."""

    def __init__(self, redis_conn, job_id: str):
        self.key, self.indexes = record.chunks_key(job_id), []
        self.conn, self.done = redis_conn, f"chunk-saves-done-{job_id}"
        ready = threading.Event()
        self.thread = threading.Thread(target=self._listen, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _listen(self, ready: threading.Event) -> None:
        with self.conn.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if self.done in command["command"]:
                    return
                if command["command"].startswith(f"HSET {self.key} "):
                    self.indexes.append(int(command["command"].split(" ")[2]))

    def stop(self) -> list[int]:
        self.conn.echo(self.done)
        self.thread.join(10)
        return self.indexes


def uninterrupted(redis_url, redis_conn, engine, request: dict) -> dict:
    job = enqueue(redis_conn, request, job_id="uninterrupted")
    run_burst(worker_settings(redis_url, **CHUNK), engine)
    return fetch(redis_conn, job.id).return_value()


def test_a_sigkilled_workers_long_job_resumes_at_its_first_unfinished_chunk(redis_url, redis_conn, engine,
                                                                           tiny_checkpoint, talk, tmp_path, procs,
                                                                           report):
    # One row at a time, so chunks finish one after another (a batch finishes them together).
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()), lost_after=2.0, batch_max_jobs=1, **CHUNK)
    pair = [start_worker(settings, tmp_path / f"worker{i}.log", max_jobs=1) for i in range(2)]
    procs.extend(pair)
    # Both load the model before the job exists (a loaded 2-core machine may need a while).
    wait_for(lambda: SimpleWorker.count(connection=redis_conn) == 2, timeout=90, what="2 workers to register")
    request = {"audio_uri": talk.as_uri(), "max_new_tokens": TOKENS}
    job = enqueue(redis_conn, request)
    wait_for(lambda: len(saved(redis_conn, job.id)) >= 2, timeout=60, what="two chunks to be saved")
    doomed, survivor = split_by_job(redis_conn, job, pair)
    saves = ChunkSaves(redis_conn, job.id)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    done_before = saved(redis_conn, job.id)
    assert 2 <= len(done_before) < CHUNKS and done_before == set(range(len(done_before)))  # a prefix
    assert fetch(redis_conn, job.id).get_status() == "started"  # killed mid-job
    assert survivor.wait(timeout=120) == 0
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished" and job.get_meta()[record.META_LOST] == 1
    # The second worker ran exactly the chunks the first had not finished, each once.
    rerun = [i for i in saves.stop() if i not in done_before]
    assert sorted(rerun) == list(range(len(done_before), CHUNKS))
    result = job.return_value()
    assert result["resumed_chunks"] == len(done_before)
    assert not redis_conn.exists(record.chunks_key(job.id))  # the result holds them now
    reference = uninterrupted(redis_url, redis_conn, engine, request)
    assert {k: result[k] for k in SAME} == {k: reference[k] for k in SAME}
    assert reference["resumed_chunks"] == 0
    report(f"resume: worker SIGKILLed after {len(done_before)} of {CHUNKS} chunks; the second worker ran "
           f"{len(rerun)}, and the result equals an uninterrupted run's")


def cancel_after_two_chunks(settings, engine, client, redis_conn, job) -> None:
    """Run ``job`` in a burst worker and cancel it once two of its chunks are saved."""

    def cancel():
        wait_for(lambda: len(saved(redis_conn, job.id)) >= 2, timeout=60, what="two chunks to be saved")
        client.cancel(job.id)

    canceller = threading.Thread(target=cancel, daemon=True)
    canceller.start()
    run_burst(settings, engine)
    canceller.join(10)


def test_a_canceled_long_job_stops_before_its_last_chunk_and_resumes_when_requeued(redis_url, redis_conn, engine,
                                                                                  talk):
    settings = worker_settings(redis_url, **CHUNK)
    client = Client(settings, connection=redis_conn)
    request = {"audio_uri": talk.as_uri(), "max_new_tokens": TOKENS}
    job = enqueue(redis_conn, request)
    cancel_after_two_chunks(settings, engine, client, redis_conn, job)
    status = client.status(job.id)
    done_before = saved(redis_conn, job.id)
    assert status.state == "canceled" and 2 <= len(done_before) < CHUNKS
    assert client.requeue([job.id])[0].action == "requeued"
    run_burst(settings, engine)
    result = fetch(redis_conn, job.id).return_value()
    assert result["resumed_chunks"] == len(done_before)
    reference = uninterrupted(redis_url, redis_conn, engine, request)
    assert {k: result[k] for k in SAME} == {k: reference[k] for k in SAME}


def test_chunks_saved_by_another_model_are_rerun(redis_url, redis_conn, engine, tiny_checkpoint, talk):
    """A job requeued after a deploy (another checkpoint here) never splices the old model's text
    into the new model's transcript: the saved chunks name the model that made them."""
    from worker.gemma4.engine import Engine

    settings = worker_settings(redis_url, **CHUNK)
    client = Client(settings, connection=redis_conn)
    job = enqueue(redis_conn, {"audio_uri": talk.as_uri(), "max_new_tokens": TOKENS})
    cancel_after_two_chunks(settings, engine, client, redis_conn, job)
    assert len(saved(redis_conn, job.id)) >= 2
    assert client.requeue([job.id])[0].action == "requeued"
    run_burst(settings, Engine.load(str(tiny_checkpoint("e2b", seed=1))))
    result = fetch(redis_conn, job.id).return_value()
    assert result["resumed_chunks"] == 0 and len(result["segments"]) == CHUNKS


def test_saved_chunks_that_do_not_match_the_audio_are_rerun(redis_url, redis_conn, engine, talk):
    """Anyone who can write Redis can write the hash: garbage is ignored and a chunk saved for other
    samples (a forged text, or audio replaced at the same URI) is not taken."""
    request = {"audio_uri": talk.as_uri(), "max_new_tokens": 3}
    job = enqueue(redis_conn, request)
    forged = ChunkText(start=0, end=1, digest="0" * 16, text="FORGED", tokens=1, audio_tokens=1)
    redis_conn.hset(record.chunks_key(job.id), mapping={"0": forged.model_dump_json(), "1": "{not json",
                                                        "x": forged.model_dump_json(), "-1": "[]"})
    run_burst(worker_settings(redis_url, **CHUNK), engine)
    result = fetch(redis_conn, job.id).return_value()
    assert result["resumed_chunks"] == 0 and "FORGED" not in result["text"]
    assert len(result["segments"]) == CHUNKS


def moto_process(port: int) -> subprocess.Popen:
    """moto's S3 server as a process of its own: killing it is a real outage (every connection closes)."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout=30, what="moto's S3 server to listen")
    return server


def test_a_long_job_retried_after_its_output_write_failed_runs_no_chunk_again(redis_url, redis_conn, engine, talk,
                                                                             monkeypatch):
    """Storage goes down for real (the S3 server is killed) while the chunks run; the write fails as
    storage_unavailable, RQ retries the job once storage is back, and the retry runs no chunk."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    servers = [moto_process(port)]

    def make_bucket() -> None:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="resume-out")

    make_bucket()
    settings = worker_settings(redis_url, s3_endpoint_url=endpoint, s3_region="us-east-1", storage_retries=1,
                               storage_retry_backoff=[8.0], **CHUNK)  # time to start the server again
    job = enqueue(redis_conn, {"audio_uri": talk.as_uri(), "max_new_tokens": TOKENS,
                               "output_uri": "s3://resume-out/t/"})
    saves: list[ChunkSaves] = []

    def storage_outage():
        # the chunks run together and finish together: the server dies while they generate,
        # long before the write (TOKENS steps), not in a race with it
        wait_for(lambda: fetch(redis_conn, job.id).get_meta().get(record.META_PROGRESS, {}).get("stage") == "generate",
                 timeout=60, what="the chunks to be generating")
        servers[0].kill()
        servers[0].wait()
        wait_for(lambda: fetch(redis_conn, job.id).get_meta().get(record.META_RETRY), timeout=60,
                 what="the failed write to be retried")
        saves.append(ChunkSaves(redis_conn, job.id))
        servers.append(moto_process(port))
        make_bucket()  # a new server starts empty

    outage = threading.Thread(target=storage_outage, daemon=True)
    outage.start()
    try:
        run_burst(settings, engine)
        outage.join(10)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    job = fetch(redis_conn, job.id)
    assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)
    assert job.get_meta()[record.META_RETRY]["code"] == "storage_unavailable"
    result = job.return_value()
    assert result["resumed_chunks"] == result["chunks"] == CHUNKS and saves[0].stop() == []
    assert result["output_uris"] == [f"s3://resume-out/t/{job.id}.json", f"s3://resume-out/t/{job.id}.txt"]
