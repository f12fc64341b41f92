"""Benchmark the queue side: enqueue rates, and a burst worker draining real jobs.

    python scripts/bench_queue.py [--jobs 5000] [--drain 20] [--model DIR]

Starts its own redis-server on a free port (nothing kept on disk), then measures:
- ``enqueue`` one request at a time (RQ ``unique``), jobs/s;
- ``enqueue_many`` of ``--jobs`` new requests (rq's unique-enqueue script, pipelined), jobs/s, and the
  same call again, which must create nothing;
- a burst worker draining ``--drain`` jobs of 5 s clips (``file://`` WAVs, 16 new tokens)
  through the real engine: wall time and jobs/minute, i.e. the per-job queue overhead on top
  of the model. Without ``--model`` it uses the tiny random e2b checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import start_redis  # noqa: E402
from producer import Client  # noqa: E402
from producer.settings import load_settings  # noqa: E402


def rate(count: int, seconds: float) -> str:
    return f"{count} in {seconds:.2f} s ({count / seconds:,.0f}/s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--single", type=int, default=1000)
    parser.add_argument("--drain", type=int, default=20)
    parser.add_argument("--model")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="audioq-bench-"))
    url, server = start_redis(workdir)
    try:
        settings = load_settings(environ={}, redis_url=url)
        client = Client(settings, connection=redis.Redis.from_url(url))

        started = time.perf_counter()
        for i in range(args.single):
            client.enqueue({"audio_uri": f"s3://bench/single/{i:06d}.wav"})
        print(f"enqueue (one at a time): {rate(args.single, time.perf_counter() - started)}")

        requests = [{"audio_uri": f"s3://bench/many/{i:06d}.wav"} for i in range(args.jobs)]
        started = time.perf_counter()
        created = sum(o.created for o in client.enqueue_many(requests))
        print(f"enqueue_many (new): {rate(args.jobs, time.perf_counter() - started)}; created {created}")
        started = time.perf_counter()
        again = sum(o.created for o in client.enqueue_many(requests))
        print(f"enqueue_many (again): {rate(args.jobs, time.perf_counter() - started)}; created {again}")
        client.connection.flushdb()

        model = args.model
        if not model:
            from make_tiny_checkpoint import build_checkpoint

            model = str(build_checkpoint(workdir / "ckpt", "e2b"))
        rng = np.random.default_rng(0)
        ids = []
        for i in range(args.drain):
            wav = workdir / f"clip{i}.wav"
            sf.write(wav, (0.1 * rng.standard_normal(5 * 16000)).astype(np.float32), 16000)
            ids.append(client.enqueue({"audio_uri": wav.as_uri(), "max_new_tokens": 16}).job_id)
        from worker.process import run_worker

        started = time.perf_counter()
        run_worker(settings.model_copy(update={"model": model}), burst=True)
        seconds = time.perf_counter() - started
        states = [s.state for s in client.status_many(ids)]
        print(f"burst worker (load + {args.drain} jobs of 5 s audio, 16 tokens): {seconds:.2f} s, "
              f"{args.drain / seconds * 60:.0f} jobs/min; states: "
              + ", ".join(f"{s} {states.count(s)}" for s in sorted(set(states))))
        return 0
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
