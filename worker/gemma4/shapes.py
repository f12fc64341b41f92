"""Shape buckets: the lengths tower batches are padded to, 36 instead of thousands.

MLX's CUDA backend builds a cuDNN plan for every new convolution shape and keeps the plans
in a fixed-size cache (128 by default). With continuous batching, clips reach the tower in
groups of any length, so unpadded groups would build plans at almost every join, and past
twice the cache's size MLX raised "Cache thrashing is happening" into a job (seen on the
H200, docs/benchmarks.md). Padding a group's length up to the next rung of a geometric
ladder, each rung an eighth longer than the last, bounds the tower's shapes to 36 lengths
per row count for at most 13 % more tower work (about 6 % on average). Padding is exact:
the tower masks padded frames. The engine pads so on CUDA only (``Engine(tower_buckets=)``):
the CPU's and Metal's kernels take any length, and there padding would only cost compute.
"""

from __future__ import annotations

from bisect import bisect_left

from worker.gemma4.features import MAX_SAMPLES, PAD_MULTIPLE

RATIO = 1.125
STEP = PAD_MULTIPLE  # every rung a multiple of the front-end's padding
FIRST = 8_000  # 0.5 s, rounded up to STEP


def _ladder() -> tuple[int, ...]:
    rungs = [-(-FIRST // STEP) * STEP]
    while rungs[-1] < MAX_SAMPLES:
        rungs.append(min(-(-int(rungs[-1] * RATIO) // STEP) * STEP, MAX_SAMPLES))
    return tuple(rungs)


RUNGS = _ladder()  # ends at MAX_SAMPLES


def tower_length(samples: int) -> int:
    """Samples a tower batch whose longest clip has ``samples`` is padded to (at most 30 s)."""
    i = bisect_left(RUNGS, samples)
    return RUNGS[i] if i < len(RUNGS) else samples
