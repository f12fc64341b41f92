"""Benchmark the Gemma 4 audio engine: load time, per-stage times, decode speed, memory.

    python scripts/bench_engine.py --model DIR [--seconds 5 30] [--files a.wav ...]
                                   [--max-new-tokens 64] [--repeat 3] [--json]
    python scripts/bench_engine.py --preset e2b      # a tiny random checkpoint, built here

Per clip it prints the front-end, audio-tower, prefill and decode times (the median of
``--repeat`` runs after one warm-up run), decode tokens/s, and at the end MLX's peak
memory and the process's peak RSS. Decoding ignores stop tokens so every run produces
exactly ``--max-new-tokens`` tokens. On Linux, run with the OpenBLAS preload noted in
docs/benchmarks.md; MLX's bundled reference BLAS is far slower.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.audio import decode_audio  # noqa: E402
from worker.gemma4.engine import Engine, check_clip  # noqa: E402


# ru_maxrss is in bytes on macOS, in kilobytes on Linux
RSS_UNITS_PER_MB = 2**20 if sys.platform == "darwin" else 2**10


def synthetic_clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def bench_clip(engine: Engine, samples: np.ndarray, max_new_tokens: int) -> dict[str, float]:
    count = check_clip(samples)
    rows, timings = engine.encode([samples])
    ids = engine.prompts.audio_prompt("Transcribe this audio.", count)
    started = time.perf_counter()
    tokens = engine.decoder.greedy(ids, rows[0], max_new_tokens, stop_ids=())
    next(tokens)
    first = time.perf_counter()
    produced = 1 + sum(1 for _ in tokens)
    done = time.perf_counter()
    timings.update(prefill=first - started, decode=done - first, tokens=produced,
                   audio_tokens=count, prompt_tokens=len(ids))
    timings["decode_tok_s"] = (produced - 1) / timings["decode"] if produced > 1 else 0.0
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or hub repo id")
    source.add_argument("--preset", help="build a tiny random checkpoint of this preset")
    parser.add_argument("--layout", default="hf", help="with --preset: hf or mlx")
    parser.add_argument("--bits", type=int, help="with --preset --layout mlx: 4 or 8")
    parser.add_argument("--seconds", type=float, nargs="*", default=[5.0, 30.0])
    parser.add_argument("--files", nargs="*", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model = args.model
    if args.preset:
        from make_tiny_checkpoint import build_checkpoint

        model = str(build_checkpoint(Path(tempfile.mkdtemp()) / args.preset, args.preset,
                                     layout=args.layout, bits=args.bits))
    started = time.perf_counter()
    engine = Engine.load(model)
    load_seconds = time.perf_counter() - started

    clips = [(f"{s:g}s synthetic", synthetic_clip(s, i)) for i, s in enumerate(args.seconds)]
    clips += [(f, decode_audio(f, max_seconds=engine.max_clip_seconds)) for f in args.files]
    results = []
    for name, samples in clips:
        bench_clip(engine, samples, args.max_new_tokens)  # warm-up: compile, allocate
        runs = [bench_clip(engine, samples, args.max_new_tokens) for _ in range(args.repeat)]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results.append({"clip": name, "audio_seconds": samples.size / 16000, **median})

    report = {
        "model": args.model or f"tiny {args.preset} ({args.layout}{f', {args.bits}-bit' if args.bits else ''})",
        "machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}",
        "load_seconds": load_seconds,
        "clips": results,
        "peak_mlx_memory_mb": mx.get_peak_memory() / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RSS_UNITS_PER_MB,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model: {report['model']}\nmachine: {report['machine']}\nload: {load_seconds:.2f} s")
    print(f"{'clip':>16} {'audio s':>7} {'tokens':>6} {'front-end ms':>12} {'tower ms':>9} "
          f"{'prefill ms':>10} {'decode ms':>9} {'decode tok/s':>12}")
    for r in results:
        print(f"{r['clip']:>16} {r['audio_seconds']:7.2f} {int(r['tokens']):6d} {r['front_end'] * 1e3:12.1f} "
              f"{r['audio_tower'] * 1e3:9.1f} {r['prefill'] * 1e3:10.1f} {r['decode'] * 1e3:9.1f} "
              f"{r['decode_tok_s']:12.1f}")
    print(f"peak MLX memory: {report['peak_mlx_memory_mb']:.1f} MB; peak RSS: {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
