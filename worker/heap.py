"""The resident heap, set aside from Python's garbage collector once a process is warmed up.

A worker holds a few hundred thousand Python objects for its whole life (botocore's S3
service model, RQ, pydantic, the tokenizer's wrappers, MLX's modules in the engine
process), and every full collection walks all of them: 130-190 ms on the CI CPU with the
interpreter lock held, every thread stopped, the first one landing at the start of the
first batch, when the first clip was being fetched (docs/benchmarks.md). ``gc.freeze``
moves what exists into a generation the collector never walks, so a collection looks only
at what jobs made since. What is garbage is collected first: frozen objects are never
freed.
"""

from __future__ import annotations

import gc


def set_aside() -> int:
    """Collect, then freeze every object that survives; returns how many are now set aside."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
