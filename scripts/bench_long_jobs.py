"""What a long job costs besides the model: saving each chunk, resuming, rendering the result.

    python scripts/bench_long_jobs.py [--hours 4] [--redis-url redis://127.0.0.1:6379/2]

On a recording of ``--hours`` cut into 30 s chunks (the plan's longest; the model is not
run, each chunk gets a 450-character text, about what 30 s of speech transcribes to):
the time to save one finished chunk (first ten and last ten of the job: a save must cost the
same however many are done), to read the saved chunks back and check them against the
samples on resume, and to render the finished result in every format. Uses the Redis
database given (keys ``audioq:chunks:bench-long-jobs`` only, deleted after).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import redis
from rq.job import Job

from producer import record
from producer.schema import JobRequest, JobResult
from producer.settings import Settings
from producer.writers import WRITERS
from worker.audio import SAMPLE_RATE
from worker.chunk_plan import Chunk, ChunkPlan
from worker.gemma4.engine import ClipOutput
from worker.recording import Recording
from worker.task import save_chunk, saved_chunks

TEXT = ("the committee met on tuesday to discuss the budget for the coming year and agreed that " * 6)[:450]


def recording(samples: np.ndarray, plan: ChunkPlan, saved=None) -> Recording:
    return Recording(samples, plan, JobRequest(audio_uri="file:///bench.wav"), 256, count_tokens=len,
                     answer_context_tokens=65536, saved=saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/2")
    args = parser.parse_args()
    total = int(args.hours * 3600 * SAMPLE_RATE)
    samples = np.zeros(total, np.float32)
    step = 30 * SAMPLE_RATE
    plan = ChunkPlan(tuple(Chunk(a, min(a + step, total)) for a in range(0, total, step)), total, total / SAMPLE_RATE)
    conn = redis.Redis.from_url(args.redis_url)
    job = Job(id="bench-long-jobs", connection=conn)
    conn.delete(record.chunks_key(job.id))
    settings = Settings()
    first = recording(samples, plan)
    saves = []
    for clip in first.clips():
        finished = first.clip_done(clip, ClipOutput(text=TEXT, tokens=[1] * 100, audio_tokens=750))
        started = time.perf_counter()
        save_chunk(job, clip.tag, finished, settings)
        saves.append(time.perf_counter() - started)
    started = time.perf_counter()
    saved = saved_chunks(job)
    read = time.perf_counter() - started
    started = time.perf_counter()
    resumed = recording(samples, plan, saved)
    check = time.perf_counter() - started
    assert resumed.complete and resumed.resumed == len(plan.chunks)
    result = JobResult(**resumed.result_fields(), model="m", worker="w")
    print(f"{args.hours:g} h, {len(plan.chunks)} chunks of 30 s, {conn.memory_usage(record.chunks_key(job.id)) / 1e6:.2f} MB "
          "of saved chunks in Redis")
    print(f"save one chunk: first ten {statistics.median(saves[:10]) * 1e3:.2f} ms, "
          f"last ten {statistics.median(saves[-10:]) * 1e3:.2f} ms (median)")
    print(f"resume: read the saved chunks {read * 1e3:.0f} ms, check them against the samples {check * 1e3:.0f} ms")
    for name, writer in WRITERS.items():
        started = time.perf_counter()
        size = len(writer.render(result))
        print(f"render {name}: {(time.perf_counter() - started) * 1e3:.0f} ms, {size / 1e3:.0f} kB")
    conn.delete(record.chunks_key(job.id))


if __name__ == "__main__":
    main()
