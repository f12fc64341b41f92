"""Benchmark the whole worker: a backlog of clips in a real S3 server, drained by one burst worker.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python scripts/bench.py [--model DIR] [--clips 256] [--min-seconds 2] [--max-seconds 30] \\
        [--max-new-tokens 64] [--batch 1 32] [--token-budget 32768] [--prefetch 4] [--join-jobs 8] \\
        [--threads 8] [--settings NAME=VALUE,...] [--workers 1 2] [--peer-python /tmp/vlmenv/bin/python] \\
        [--peer-clips 16] [--json summary.json] [--log-dir DIR] [--profile] [--timeline]

Starts its own redis-server and moto's S3 server (nothing kept), uploads ``--clips`` WAVs of
mixed length (``bench_common.synthetic_clip``: clip i lasts a seeded random 2-30 s), enqueues
them through the producer (``Client.enqueue_many``), and drains the backlog with a burst
``audioq worker`` subprocess per ``--batch`` value (``batch_max_jobs``; 1 is "batching off").
For each it prints audio seconds per wall second, generated tokens per second, the per-stage
split (summed over jobs), queue + storage overhead (the share of the backlog's wall time the
engine was idle: between the first job's start and the last job's end, minus the time the
worker's batches ran the engine, which is their time inside ``Engine.stream`` less the
engine loop's own time in the worker's ``feed`` and ``on_done``: in an engine process, the
child's waits for clips), warm-up, and the worker's peak RSS and MLX memory. Without
``--model`` it builds a random checkpoint of ``--preset`` (default ``e2b-audio``: the real
audio-tower dimensions), mlx layout.

With ``--workers 2`` (or more) that many burst workers drain the backlog at once, each with
``--batch`` / workers jobs and ``--token-budget`` / workers (its own ``--prefetch``), as
several workers sharing one machine's accelerator would. The engine totals are then summed
over the workers (engine seconds, which can pass the wall time), their peaks and memory
too (at most the machine's: the peaks need not coincide), and the overhead is the idlest
engine's, a worker that started late or got few jobs included.

With ``--peer-python`` (a separate venv with mlx-vlm 0.7.10, never an audioq dependency) it
runs ``scripts/bench_peer_mlx_vlm.py`` on the first ``--peer-clips`` of the same clips, one at
a time, and prints its throughput (model time only: no queue, no storage) and the ratio.
Random weights: audioq stops at a stop id while mlx-vlm always generates ``--max-new-tokens``,
so compare tokens per second as well as audio seconds per second.

With ``--timeline`` the worker's engine records its calls (``scripts/timeline``): each drain
prints when the batch filled and emptied, its decode steps after joins and compactions
against the others, and its tower and prefill calls' sizes; the events stay beside the log.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "scripts" / "timeline")]

import engine_timeline  # noqa: E402
from bench_common import synthetic_clip  # noqa: E402
from demo import free_port, start_redis  # noqa: E402

WORKER_MODE = "--run-worker"
PROFILE_VARIABLE = "AUDIOQ_BENCH_PROFILE"
TIMELINE_VARIABLE = "AUDIOQ_TIMELINE"
TIMELINE = REPO / "scripts" / "timeline"
STAGES = ("fetch", "decode_audio", "front_end", "audio_tower", "prefill", "generate", "write")
BATCH_LINE = re.compile(r"batch: (\d+) jobs in ([\d.]+) s, ([\d.]+) s of it outside the engine[^;]*; engine: (.*)")
WARM_UP_LINE = re.compile(r"warm-up .* took ([\d.]+) s")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def clip_lengths(count: int, low: float, high: float) -> list[float]:
    return [round(float(s), 2) for s in np.random.default_rng(1234).uniform(low, high, count)]


def start_s3() -> tuple[str, object]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return f"http://127.0.0.1:{port}", server


def upload(endpoint: str, lengths: list[float]) -> list[str]:
    import boto3
    import soundfile as sf

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    uris = []
    for i, seconds in enumerate(lengths):
        body = io.BytesIO()
        sf.write(body, synthetic_clip(seconds, i), 16000, format="WAV", subtype="PCM_16")
        s3.put_object(Bucket="bench", Key=f"clips/{i:05d}.wav", Body=body.getvalue())
        uris.append(f"s3://bench/clips/{i:05d}.wav")
    return uris


def drain(settings, uris: list[str], max_new_tokens: int, log_dir: Path, profile: bool = False,
          variant: str = "", timeline: bool = False, workers: int = 1) -> dict:
    """Enqueue the backlog, drain it with ``workers`` burst worker subprocesses at once (each with its own
    engine process: several workers sharing one machine's accelerator), and summarise the records."""
    import redis

    from producer import Client

    connection = redis.Redis.from_url(settings.redis_url)
    connection.flushdb()
    client = Client(settings, connection=connection)
    started = time.perf_counter()
    ids = [o.job_id for o in client.enqueue_many([{"audio_uri": u, "max_new_tokens": max_new_tokens} for u in uris])]
    enqueue_seconds = time.perf_counter() - started
    base = re.sub(r"[^\w.-]", "_", f"worker-{settings.batch_max_jobs}-{settings.prefetch_threads}-"
                  f"{settings.batch_join_jobs}-{'process' if settings.engine_process else 'inline'}"
                  f"{f'-x{workers}' if workers > 1 else ''}{'-' + variant if variant else ''}")
    run_name, repeat = base, 1
    first_log = "" if workers == 1 else ".w0"
    while (log_dir / f"{run_name}{first_log}.log").exists():  # the same configuration run again keeps its own logs
        repeat += 1
        run_name = f"{base}.run{repeat}"
    names = [run_name + (f".w{k}" if workers > 1 else "") for k in range(workers)]
    log_paths = [log_dir / f"{name}.log" for name in names]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    events = log_dir / f"{run_name}.timeline"
    if timeline:
        events.mkdir()
        env.update({TIMELINE_VARIABLE: str(events), "PYTHONPATH": os.pathsep.join([str(TIMELINE), env["PYTHONPATH"]])})
    logs = [open(path, "w") for path in log_paths]
    running: list[subprocess.Popen] = []
    try:
        for name, log in zip(names, logs):
            running.append(subprocess.Popen([sys.executable, __file__, WORKER_MODE, settings.model_dump_json()],
                                            env={**env, PROFILE_VARIABLE: str(log_dir / f"{name}.profile.txt")}
                                            if profile else env, stdout=log, stderr=subprocess.STDOUT))
        failed = [f"{path} (status {process.returncode})" for process, path in zip(running, log_paths)
                  if process.wait() != 0]
        if failed:
            raise RuntimeError(f"worker(s) failed: {', '.join(failed)}")
    except BaseException:  # interrupted, or a worker failed: none outlives the run (its Redis and S3 stop next)
        for process in running:
            process.kill()
            process.wait()
        raise
    finally:
        for log in logs:
            log.close()
    texts = [path.read_text() for path in log_paths]
    memories = [json.loads(text.rsplit("BENCH-WORKER ", 1)[1].splitlines()[0]) for text in texts]
    memory = {name: sum(m[name] for m in memories) for name in memories[0]}  # the workers' together: one machine
    per_worker = [BATCH_LINE.findall(text) for text in texts]
    engine_totals: dict[str, float] = {}  # the engines' own (Engine.stream's totals), summed over the workers
    for totals in map(worker_totals, per_worker):
        for name, value in totals.items():
            engine_totals[name] = engine_totals.get(name, 0) + value
    if "peak_mlx_memory_mb" in engine_totals:  # the engine processes' own (the worker's is not the model's)
        memory["peak_mlx_memory_mb"] = engine_totals["peak_mlx_memory_mb"]
    jobs = client.status_many(ids)
    states = {s.state for s in jobs}
    failures = sorted({f"{s.failure.code.value}: {s.failure.message}" for s in jobs if s.failure})
    assert states == {"finished"}, (f"jobs not all finished: {sorted(states)}; first failures: {failures[:3]}; "
                                    f"worker logs: {', '.join(map(str, log_paths))}")
    results = [s.result for s in jobs]
    first = min(j.started_at for j in jobs)
    last = max(j.ended_at for j in jobs)
    wall = (last - first).total_seconds()
    # each engine's busy time: its batches' wall less their time outside it; the overhead is the idlest engine's
    in_engine = min(sum(float(b_wall) - float(out) for _, b_wall, out, _ in batches) for batches in per_worker)
    audio = sum(r.audio_seconds for r in results)
    tokens = sum(r.tokens for r in results)
    return {
        "settings": variant, "workers": workers, "engine_process": settings.engine_process,
        "batch_max_jobs": settings.batch_max_jobs, "prefetch_threads": settings.prefetch_threads,
        "batch_join_jobs": settings.batch_join_jobs, "jobs": len(ids), "audio_seconds": audio, "tokens": tokens,
        "enqueue_seconds": enqueue_seconds, "backlog_wall_seconds": wall,
        "audio_seconds_per_wall_second": audio / wall, "tokens_per_second": tokens / wall,
        "stage_seconds": {s: sum(r.timings.get(s, 0.0) for r in results) for s in STAGES},
        "queue_storage_overhead": max(0.0, wall - in_engine) / wall,
        "engine_totals": engine_totals, "batches": sum(map(len, per_worker)),
        "warm_up_seconds": max(float(WARM_UP_LINE.search(text).group(1)) for text in texts), **memory,
        "timeline": engine_timeline.summary(events) if timeline else [],
    }


def worker_totals(batches: list[tuple]) -> dict[str, float]:
    """One worker's engine totals from its batch lines: seconds and counts summed, peaks the largest."""
    totals: dict[str, float] = {}
    for *_, line in batches:
        for name, value in (item.rsplit(" ", 1) for item in line.split(", ") if " " in item):
            totals[name] = (max if name.startswith("peak") else sum)((totals.get(name, 0), float(value)))
    return totals


def peer(python: str, model: str, lengths: list[float], max_new_tokens: int) -> dict:
    out = subprocess.run([python, str(REPO / "scripts" / "bench_peer_mlx_vlm.py"), "--model", model, "--seconds",
                          *map(str, lengths), "--max-new-tokens", str(max_new_tokens), "--repeat", "1", "--json"],
                         check=True, capture_output=True, text=True).stdout
    report = json.loads(out[out.index("{"):])
    clips = report["clips"]
    seconds = sum(c["front_end"] + c["audio_tower"] + c["prefill"] + c["decode"] for c in clips)
    audio = sum(c["audio_seconds"] for c in clips)
    tokens = sum(c["tokens"] for c in clips)
    return {"system": report["system"], "clips": len(clips), "audio_seconds": audio, "model_seconds": seconds,
            "audio_seconds_per_wall_second": audio / seconds, "tokens_per_second": tokens / seconds,
            "peak_rss_mb": report["peak_rss_mb"], "peak_mlx_memory_mb": report["peak_mlx_memory_mb"]}


def print_run(run: dict) -> None:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items())
    print(f"{describe(run)}: {run['jobs']} jobs, {run['audio_seconds']:.0f} audio s in "
          f"{run['backlog_wall_seconds']:.1f} s: {run['audio_seconds_per_wall_second']:.2f} audio s / wall s, "
          f"{run['tokens_per_second']:.1f} tok/s; queue + storage overhead {run['queue_storage_overhead']:.1%}; "
          f"warm-up {run['warm_up_seconds']:.2f} s; peak RSS {run['peak_rss_mb']:.0f} MB, "
          f"MLX {run['peak_mlx_memory_mb']:.0f} MB\n    stage seconds (summed over jobs): {stages}\n    engine: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sorted(run["engine_totals"].items())))
    for line in run["timeline"]:
        print("    timeline: " + line)


def describe(run: dict) -> str:
    return (f"{run['workers']} x " if run["workers"] > 1 else "") + (
        f"engine_process {run['engine_process']}, batch_max_jobs {run['batch_max_jobs']}, prefetch_threads "
        f"{run['prefetch_threads']}, join {run['batch_join_jobs']}" + (f", {run['settings']}" if run["settings"] else ""))


def run_worker_mode(settings_json: str) -> int:
    from bench_common import memory
    from producer.settings import Settings
    from worker.process import run_worker

    settings = Settings.model_validate_json(settings_json)
    profile = os.environ.get(PROFILE_VARIABLE)
    if profile:  # the worker under cProfile (3.11: the main thread only), its top functions to the file
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        status = profiler.runcall(run_worker, settings, burst=True)
        profiler.dump_stats(profile + ".pstats")  # for pstats' callers and callees
        with open(profile, "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(60)
    else:
        status = run_worker(settings, burst=True)
    print("BENCH-WORKER " + json.dumps(memory()), flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: build one of --preset)")
    parser.add_argument("--preset", default="e2b-audio", help="scripts/make_tiny_checkpoint.py preset to build")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch_max_jobs values to run")
    parser.add_argument("--prefetch", type=int, default=4, help="prefetch_jobs")
    parser.add_argument("--join-jobs", type=int, nargs="+", default=[8], help="batch_join_jobs values to run, "
                        "each with every --batch value")
    parser.add_argument("--threads", type=int, nargs="+", default=[8], help="prefetch_threads values to run, "
                        "each with every --batch value")
    parser.add_argument("--engine-process", choices=["on", "off"], nargs="+", default=["on"],
                        help="engine_process values to run (off: the model in the worker's own process)")
    parser.add_argument("--token-budget", type=int, default=32768,
                        help="batch_token_budget: KV rows the running clips may hold (a GPU takes far more)")
    parser.add_argument("--settings", nargs="+", default=[""], metavar="NAME=VALUE,...",
                        help="worker settings per run, e.g. batch_encode_clips=32,batch_padding_slack=2 "
                        "(each variant runs with every other combination; '' for the defaults)")
    parser.add_argument("--workers", type=positive, nargs="+", default=[1],
                        help="burst workers draining the backlog at once, each with its own engine process and "
                        "--batch / workers jobs, at least 1 (and --token-budget / workers): the machine runs "
                        "about as many rows")
    parser.add_argument("--peer-python", help="python of a venv with mlx-vlm 0.7.10 (skipped without)")
    parser.add_argument("--peer-clips", type=int, default=16, help="how many of the clips the peer runs")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--log-dir", type=Path, help="keep the worker logs here (default: deleted with the run)")
    parser.add_argument("--timeline", action="store_true", help="record the engine's calls in each drain and "
                        "print their summary (scripts/timeline)")
    parser.add_argument("--profile", action="store_true",
                        help="run each worker under cProfile (its main thread; from Python 3.12 on, cProfile "
                        "sees every thread); its top functions go beside its log")
    args = parser.parse_args()
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    from producer.settings import load_settings

    workdir = Path(tempfile.mkdtemp(prefix="audioq-bench-"))
    redis_url, redis_server = start_redis(workdir)
    endpoint, s3_server = start_s3()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    try:
        model = args.model
        if not model:
            from make_tiny_checkpoint import build_checkpoint

            model = str(build_checkpoint(workdir / "ckpt", args.preset, layout="mlx"))
        lengths = clip_lengths(args.clips, args.min_seconds, args.max_seconds)
        uris = upload(endpoint, lengths)
        summary = {"model": model, "clips": args.clips, "clip_seconds": [args.min_seconds, args.max_seconds],
                   "max_new_tokens": args.max_new_tokens, "runs": []}
        for variant, process, threads, join, batch, workers in [
                (v, p, t, j, b, w) for v in args.settings for p in args.engine_process for t in args.threads
                for j in args.join_jobs for b in args.batch for w in args.workers]:
            overrides = dict(item.split("=", 1) for item in variant.split(",") if item)
            settings = load_settings(environ={}, redis_url=redis_url, model=model, s3_endpoint_url=endpoint,
                                     s3_region="us-east-1", s3_addressing_style="path",
                                     batch_max_jobs=max(batch // workers, 1),
                                     batch_token_budget=max(args.token_budget // workers, 1),
                                     prefetch_jobs=args.prefetch, prefetch_threads=threads, batch_join_jobs=join,
                                     default_max_new_tokens=args.max_new_tokens, engine_process=process == "on",
                                     **overrides)
            run = drain(settings, uris, args.max_new_tokens, args.log_dir or workdir, args.profile, variant,
                        args.timeline, workers)
            summary["runs"].append(run)
            print_run(run)
        if args.peer_python:
            summary["peer"] = peer(args.peer_python, model, lengths[:args.peer_clips], args.max_new_tokens)
            p = summary["peer"]
            print(f"{p['system']}, one at a time, {p['clips']} clips: {p['audio_seconds_per_wall_second']:.2f} "
                  f"audio s / s, {p['tokens_per_second']:.1f} tok/s (model time only); peak RSS "
                  f"{p['peak_rss_mb']:.0f} MB")
            for run in summary["runs"]:
                run["ratio_to_peer"] = run["audio_seconds_per_wall_second"] / p["audio_seconds_per_wall_second"]
                run["token_ratio_to_peer"] = run["tokens_per_second"] / p["tokens_per_second"]
                print(f"{describe(run)} / peer: {run['ratio_to_peer']:.2f}x audio s/s, "
                      f"{run['token_ratio_to_peer']:.2f}x tok/s")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        s3_server.stop()
        redis_server.terminate()
        redis_server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_MODE:
        sys.exit(run_worker_mode(sys.argv[2]))
    sys.exit(main())
