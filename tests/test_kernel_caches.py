"""MLX's per-shape kernel caches never fail a job: few tower shapes, and no lifetime-miss fuse.

Without buckets every join of a running batch brought a new tower shape, and on the H200
MLX's CUDA convolution cache raised "Cache thrashing is happening" into a job. That the
padding changes no token is test_engine_batching's (``tower_buckets=True`` on the CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

from worker.gemma4.engine import CALL_SIZES
from worker.gemma4.features import MAX_SAMPLES, SAMPLE_RATE
from worker.gemma4.shapes import RUNGS, tower_length

EVERY_LENGTH = range(1, MAX_SAMPLES + 1, 37)  # every length a clip can have, sampled finely


def test_any_clip_length_maps_to_one_of_36_tower_lengths():
    assert len({tower_length(n) for n in EVERY_LENGTH} | {tower_length(MAX_SAMPLES)}) <= 36


def test_a_bucket_holds_its_clip_and_never_passes_30_seconds():
    for n in EVERY_LENGTH:
        assert n <= tower_length(n) <= MAX_SAMPLES
    assert tower_length(MAX_SAMPLES) == MAX_SAMPLES


def test_padding_costs_at_most_13_percent_past_the_first_bucket():
    first = tower_length(1)
    assert first <= 0.51 * SAMPLE_RATE
    assert max(tower_length(n) / n for n in EVERY_LENGTH if n > first) <= 1.131


def test_longer_clips_never_get_shorter_buckets():
    lengths = [tower_length(n) for n in EVERY_LENGTH]
    assert lengths == sorted(lengths)


def cache_env_after_import(**environ: str) -> list[str]:
    code = ("import os, worker.gemma4; print(os.environ['MLX_ENABLE_CACHE_THRASHING_CHECK'], "
            "os.environ['MLX_CUDA_CONV_CACHE_SIZE'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")} | environ
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_engine_turns_mlx_cache_thrashing_errors_off_unless_the_operator_chose():
    check, conv_cache = cache_env_after_import()
    assert check == "0"
    # room for a plan per convolution (two) of every bucketed tower shape CUDA's tower calls can have
    assert int(conv_cache) >= 2 * len(RUNGS) * CALL_SIZES["cuda"]["encode_rows"]
    assert cache_env_after_import(MLX_ENABLE_CACHE_THRASHING_CHECK="1", MLX_CUDA_CONV_CACHE_SIZE="64") == ["1", "64"]
