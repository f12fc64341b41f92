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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine, medians, memory, print_table, synthetic_clip  # noqa: E402
from worker.audio import decode_audio  # noqa: E402
from worker.gemma4.engine import Engine, check_clip  # noqa: E402


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
        results.append({"clip": name, "audio_seconds": samples.size / 16000, **medians(runs)})

    report = {
        "model": args.model or f"tiny {args.preset} ({args.layout}{f', {args.bits}-bit' if args.bits else ''})",
        "machine": machine(),
        "load_seconds": load_seconds,
        "clips": results,
        **memory(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model: {report['model']}\nmachine: {report['machine']}\nload: {load_seconds:.2f} s")
    print_table(results)
    print(f"peak MLX memory: {report['peak_mlx_memory_mb']:.1f} MB; peak RSS: {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
