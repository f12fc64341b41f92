"""Benchmark the Gemma 4 audio engine: load, warm-up, one clip alone, and batched streams.

    python scripts/bench_engine.py --model DIR [--seconds 5 30] [--files a.wav ...]
                                   [--batch 8 32] [--max-new-tokens 64] [--repeat 3] [--json]
    python scripts/bench_engine.py --preset e2b      # a tiny random checkpoint, built here

One clip alone (``--seconds``, ``--files``): the front-end, audio-tower, prefill and decode
times of each clip (the median of ``--repeat`` runs), decode tokens/s.

Batched (``--batch B ...``): for each B, B clips as one ``Engine.stream`` — equal 10 s
clips, and mixed lengths 2–30 s (fixed seeds) — with audio seconds per wall second, decode
tokens/s, the per-stage split of the stream, its decode steps (ms a step, and of that the
wait for the device's tokens), the rows that joined into holes and the joins and hole drops
that copied the whole cache, and MLX's peak memory during it (median of
``--repeat`` runs, after a first run whose wall and tower seconds are printed too: the
cost of shapes met for the first time), and the same clips one at a time for the ratio
(``--no-alone`` skips that).

Decoding ignores stop tokens (``stop_ids=()``) so every clip produces exactly
``--max-new-tokens`` tokens. ``Engine.warm_up`` runs first, and its time is reported. On
Linux, run with the OpenBLAS preload noted in docs/benchmarks.md; MLX's bundled reference
BLAS is far slower. On MLX CUDA everything runs on the GPU as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine, medians, memory, print_table, synthetic_clip  # noqa: E402
from worker.audio import decode_audio  # noqa: E402
from worker.gemma4.engine import ClipRequest, Engine  # noqa: E402

INSTRUCTION = "Transcribe this audio."


def stream(engine: Engine, clips: list[np.ndarray], max_new_tokens: int, per_step: int | None = None,
           **limits: int) -> dict:
    """All clips as one stream, at most ``per_step`` given a step; totals of the stream plus each clip's outputs."""
    pending = [ClipRequest(c, INSTRUCTION, max_new_tokens) for c in clips]
    per_step = per_step or len(pending)
    outputs = []

    def on_done(clip, outcome):
        if isinstance(outcome, BaseException):
            raise outcome
        outputs.append(outcome)

    mx.reset_peak_memory()
    started = time.perf_counter()
    stats = engine.stream(lambda free: [pending.pop(0) for _ in range(min(free, per_step, len(pending)))],
                          on_done, stop_ids=(), **limits)
    wall = time.perf_counter() - started
    return {**stats, "wall": wall, "outputs": outputs, "peak_mlx_memory_mb": mx.get_peak_memory() / 2**20}


def bench_clip(engine: Engine, samples: np.ndarray, max_new_tokens: int) -> dict[str, float]:
    """One clip alone, per stage."""
    run = stream(engine, [samples], max_new_tokens)
    (out,) = run["outputs"]
    t = out.timings
    produced = len(out.tokens)
    return {"front_end": t["front_end"], "audio_tower": t["audio_tower"], "prefill": t["prefill"],
            "decode": t["generate"], "tokens": produced, "audio_tokens": out.audio_tokens,
            "decode_tok_s": (produced - 1) / t["generate"] if produced > 1 else 0.0}


def bench_batch(engine: Engine, clips: list[np.ndarray], max_new_tokens: int, repeat: int, alone: bool,
                per_step: int | None) -> dict:
    audio = sum(c.size for c in clips) / 16000
    first = stream(engine, clips, max_new_tokens, per_step)  # the first use of these shapes
    runs = []
    for _ in range(repeat):
        run = stream(engine, clips, max_new_tokens, per_step)
        runs.append({"wall": run["wall"], "audio_s_per_s": audio / run["wall"],
                     "decode_tok_s": run["tokens"] / run["decode"],
                     "front_end": run["front_end"], "audio_tower": run["audio_tower"],
                     "prefill": run["prefill"], "decode": run["decode"], "peak_rows": run["peak_rows"],
                     "steps": run["steps"], "step_ms": 1000 * run["decode"] / max(run["steps"], 1),
                     "wait_ms": 1000 * run["decode_wait"] / max(run["steps"], 1), "placed": run["placed"],
                     "appends": run["appends"], "compactions": run["compactions"],
                     "peak_mlx_memory_mb": run["peak_mlx_memory_mb"]})
    result = {"clips": len(clips), "audio_seconds": audio, **medians(runs), "first_wall": first["wall"],
              "first_audio_tower": first["audio_tower"], "one_at_a_time_audio_s_per_s": math.nan,
              "speedup": math.nan}
    if alone:
        walls = []
        for _ in range(repeat):
            started = time.perf_counter()
            for c in clips:
                stream(engine, [c], max_new_tokens, max_rows=1)
            walls.append(time.perf_counter() - started)
        result["one_at_a_time_audio_s_per_s"] = audio / statistics.median(walls)
        result["speedup"] = result["audio_s_per_s"] / result["one_at_a_time_audio_s_per_s"]
    return result


def batch_clips(kind: str, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    seconds = [10.0] * count if kind == "equal" else rng.uniform(2.0, 30.0, count).round(2).tolist()
    return [synthetic_clip(s, i) for i, s in enumerate(seconds)]


BATCH_COLUMNS = [  # title, width, cell template over one result
    ("clips", 12, "{name}"), ("audio s", 8, "{audio_seconds:.1f}"), ("audio s/s", 9, "{audio_s_per_s:.1f}"),
    ("alone s/s", 9, "{one_at_a_time_audio_s_per_s:.1f}"), ("x", 5, "{speedup:.1f}"),
    ("tok/s", 8, "{decode_tok_s:.0f}"), ("front s", 7, "{front_end:.2f}"), ("tower s", 7, "{audio_tower:.2f}"),
    ("prefill s", 9, "{prefill:.2f}"), ("decode s", 8, "{decode:.2f}"), ("rows", 4, "{peak_rows:.0f}"),
    ("steps", 5, "{steps:.0f}"), ("ms/step", 7, "{step_ms:.1f}"), ("wait ms", 7, "{wait_ms:.1f}"),
    ("placed", 6, "{placed:.0f}"), ("appends", 7, "{appends:.0f}"), ("compact", 7, "{compactions:.0f}"),
    ("1st wall", 8, "{first_wall:.2f}"), ("1st tower", 9, "{first_audio_tower:.2f}"),
    ("peak MB", 8, "{peak_mlx_memory_mb:.0f}"),
]


def print_batches(results: list[dict]) -> None:
    print(" ".join(f"{title:>{width}}" for title, width, _ in BATCH_COLUMNS))
    for r in results:
        print(" ".join(f"{cell.format(**r):>{width}}" for _, width, cell in BATCH_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory or hub repo id")
    source.add_argument("--preset", help="build a tiny random checkpoint of this preset")
    parser.add_argument("--layout", default="hf", help="with --preset: hf or mlx")
    parser.add_argument("--bits", type=int, help="with --preset --layout mlx: 4 or 8")
    parser.add_argument("--seconds", type=float, nargs="*", default=[5.0, 30.0])
    parser.add_argument("--files", nargs="*", default=[])
    parser.add_argument("--batch", type=int, nargs="*", default=[], help="stream sizes B to run")
    parser.add_argument("--mix", choices=["equal", "mixed", "both"], default="both")
    parser.add_argument("--max-rows", type=int, default=None, help="the engine's max_rows (default: its own)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="the engine's KV budget (default: its own)")
    parser.add_argument("--encode-rows", type=int, default=None, help="clips per tower batch (default: the engine's)")
    parser.add_argument("--join-rows", type=int, default=None, help="the engine's join_rows (default: its own)")
    parser.add_argument("--join-wait", type=float, default=0.25, help="the engine's join_wait, with --join-rows")
    parser.add_argument("--feed-per-step", type=int, default=None,
                        help="batched streams get at most this many clips a step, as a worker's prefetch feeds them")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-alone", action="store_true", help="skip running each batch's clips one at a time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model = args.model
    if args.preset:
        from make_tiny_checkpoint import build_checkpoint

        model = str(build_checkpoint(Path(tempfile.mkdtemp()) / args.preset, args.preset,
                                     layout=args.layout, bits=args.bits))
    started = time.perf_counter()
    options = {name: value for name, value in (("max_rows", args.max_rows), ("encode_rows", args.encode_rows),
                                               ("max_batch_tokens", args.max_batch_tokens),
                                               ("join_rows", args.join_rows)) if value}
    if args.join_rows:
        options["join_wait"] = args.join_wait
    engine = Engine.load(model, **options)
    load_seconds = time.perf_counter() - started
    warm_up_seconds = engine.warm_up()

    clips = [(f"{s:g}s synthetic", synthetic_clip(s, i)) for i, s in enumerate(args.seconds)]
    clips += [(f, decode_audio(f, max_seconds=engine.max_clip_seconds)) for f in args.files]
    results = []
    for name, samples in clips:
        bench_clip(engine, samples, args.max_new_tokens)  # first use of these shapes
        runs = [bench_clip(engine, samples, args.max_new_tokens) for _ in range(args.repeat)]
        results.append({"clip": name, "audio_seconds": samples.size / 16000, **medians(runs)})

    batches = []
    kinds = ["equal", "mixed"] if args.mix == "both" else [args.mix]
    for count in args.batch:
        for kind in kinds:
            batch = batch_clips(kind, count)
            batches.append({"name": f"{count} {kind}", **bench_batch(engine, batch, args.max_new_tokens,
                                                                     args.repeat, not args.no_alone,
                                                                     args.feed_per_step)})

    report = {
        "model": args.model or f"tiny {args.preset} ({args.layout}{f', {args.bits}-bit' if args.bits else ''})",
        "machine": machine(),
        "load_seconds": load_seconds,
        "warm_up_seconds": warm_up_seconds,
        "engine_limits": engine.limits,
        "clips": results,
        "batches": batches,
        **memory(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model: {report['model']}\nmachine: {report['machine']}\nload: {load_seconds:.2f} s; "
          f"warm-up: {warm_up_seconds:.2f} s; limits: {engine.limits}")
    if results:
        print_table(results)
    if batches:
        print_batches(batches)
    print(f"peak MLX memory: {report['peak_mlx_memory_mb']:.1f} MB; peak RSS: {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
