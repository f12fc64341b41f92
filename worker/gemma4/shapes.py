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

from functools import lru_cache

from worker.gemma4.features import MAX_SAMPLES, PAD_MULTIPLE

RATIO = 1.125
STEP = PAD_MULTIPLE  # every rung a multiple of the front-end's padding
FIRST = 8_000  # 0.5 s, rounded up to STEP


@lru_cache(maxsize=4096)
def _rung(samples: int) -> int:
    rung = -(-FIRST // STEP) * STEP
    while rung < samples:
        rung = -(-int(rung * RATIO) // STEP) * STEP
    return rung


def tower_length(samples: int) -> int:
    """Samples a tower batch whose longest clip has ``samples`` is padded to (at most 30 s)."""
    return max(samples, min(_rung(samples), MAX_SAMPLES))
