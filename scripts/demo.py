"""The whole flow on embedded defaults: audio in S3 → queue → worker → transcripts.

    python scripts/demo.py [--model DIR_OR_REPO] [--redis-url URL] [--clips N]

Without options it starts its own redis-server (on a free port, nothing kept on disk),
moto's S3 server, builds a tiny random-weight Gemma 4 checkpoint (so the "transcripts"
are random tokens — give ``--model`` for real text), writes a few clips (spoken with
espeak-ng when it is installed, tones otherwise, plus one file that is not audio),
enqueues every object under the prefix with the ``audioq`` command, drains the queue with
a burst worker process, and prints the results and the queue summary.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import boto3
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from producer.cli import main as audioq  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please transcribe this short recording of synthetic speech.",
    "Queues let one Mac work through a backlog overnight.",
    "Every job ends with a transcript or a precise reason.",
]
BUCKET = "audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[str, subprocess.Popen]:
    if not shutil.which("redis-server"):
        sys.exit("demo: redis-server is not installed (scripts/setup.sh installs it), or pass --redis-url")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return f"redis://127.0.0.1:{port}/0", proc
        except redis.ConnectionError:
            time.sleep(0.05)
    sys.exit("demo: redis-server did not start")


class AofRedis:
    """A redis-server with its AOF in ``directory`` (every write fsynced), on a free loopback port,
    that can be stopped and started again on the same port: a Redis restart that loses nothing.
    ``scripts/bench_load.py`` and the worker's Redis-restart tests use it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
                                     stdout=(self.directory / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout:g} s "
                                   f"(log: {self.directory / 'redis.log'})")
            time.sleep(0.05)

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port).ping())
        except redis.RedisError:  # not up yet, or still loading its AOF
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def make_clips(workdir: Path, count: int) -> list[Path]:
    """Spoken sentences (espeak-ng) or tones, in a mix of formats, plus one non-audio file."""
    clips = []
    for i in range(count):
        wav = workdir / f"clip{i}.wav"
        if shutil.which("espeak-ng"):
            subprocess.run(["espeak-ng", "-w", str(wav), SENTENCES[i % len(SENTENCES)]], check=True)
        else:
            t = np.arange(int(16000 * (1.5 + i))) / 16000
            sf.write(wav, 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t), 16000)
        if i % 3 == 1:  # show that other containers decode too
            data, sr = sf.read(wav)
            wav.unlink()
            wav = wav.with_suffix(".flac")
            sf.write(wav, data, sr)
        clips.append(wav)
    bad = workdir / "notes.mp3"  # named like audio, but it is text: fails as unsupported_format
    bad.write_text("this is not audio\n" * 20)
    return clips + [bad]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory or hub repo id (default: a tiny random one)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--clips", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="audioq-demo-"))
    processes, s3 = [], None
    try:
        redis_url = args.redis_url
        if not redis_url:
            redis_url, proc = start_redis(workdir)
            processes.append(proc)
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        s3.start()
        host, port = s3.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(AUDIOQ_REDIS_URL=redis_url, AUDIOQ_S3_ENDPOINT_URL=endpoint,
                          AUDIOQ_S3_REGION="us-east-1", AWS_ACCESS_KEY_ID="demo",
                          AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
        print(f"redis: {redis_url}\ns3:    {endpoint} (moto)")

        model = args.model
        if not model:
            from make_tiny_checkpoint import build_checkpoint

            # keyed by the builder's content, so a changed builder gives a fresh checkpoint
            builder = hashlib.sha256((REPO / "scripts" / "make_tiny_checkpoint.py").read_bytes()).hexdigest()
            cached = REPO / ".cache" / f"demo-checkpoint-e2b-{builder[:12]}"
            if not (cached / "config.json").exists():
                build_checkpoint(cached, "e2b")
            model = str(cached)
            print(f"model: {model} (tiny random weights: the text will be random tokens)")

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for clip in make_clips(workdir, args.clips):
            client.upload_file(str(clip), BUCKET, f"demo/{clip.name}")
        print(f"uploaded {args.clips + 1} objects to s3://{BUCKET}/demo/\n")

        print("$ audioq enqueue --prefix s3://audio/demo/")
        audioq(["enqueue", "--prefix", f"s3://{BUCKET}/demo/", "--max-new-tokens", "24"])
        print(f"\n$ audioq worker --model {model} --burst")
        worker = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--model", model, "--burst"],
                                cwd=REPO, env=os.environ.copy())
        print("\n$ audioq list --state finished / failed, then audioq results")
        ids = []
        for state in ("finished", "failed"):
            out = io.StringIO()
            with redirect_stdout(out):
                audioq(["list", "--state", state, "--json"])
            ids += [job["id"] for job in json.loads(out.getvalue())]
        audioq(["results", *ids])
        print("\n$ audioq info")
        audioq(["info"])
        return worker.returncode
    finally:
        if s3 is not None:
            s3.stop()
        for proc in processes:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
