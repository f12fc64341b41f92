"""What the engine benchmarks share, so audioq and the peer are measured and printed alike.

Only numpy and mlx: ``bench_peer_mlx_vlm.py`` imports it from the peer's own environment.
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys

import mlx.core as mx
import numpy as np

# ru_maxrss is in bytes on macOS, in kilobytes on Linux
RSS_UNITS_PER_MB = 2**20 if sys.platform == "darwin" else 2**10


def synthetic_clip(seconds: float, seed: int) -> np.ndarray:
    """A 220 Hz tone with a little noise: the same clip for the same (seconds, seed) everywhere."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over repeated runs; keys starting with ``_`` are private to a run."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if not k.startswith("_")}


def machine() -> str:
    return f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}"


def memory() -> dict[str, float]:
    return {"peak_mlx_memory_mb": mx.get_peak_memory() / 2**20,
            # with the children it waited for (a worker's engine process): the two peaks added, an upper bound
            "peak_rss_mb": sum(resource.getrusage(who).ru_maxrss
                               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / RSS_UNITS_PER_MB}


def print_table(results: list[dict]) -> None:
    print(f"{'clip':>16} {'audio s':>7} {'tokens':>6} {'front-end ms':>12} {'tower ms':>9} "
          f"{'prefill ms':>10} {'decode ms':>9} {'decode tok/s':>12}")
    for r in results:
        print(f"{r['clip']:>16} {r['audio_seconds']:7.2f} {int(r['tokens']):6d} {r['front_end'] * 1e3:12.1f} "
              f"{r['audio_tower'] * 1e3:9.1f} {r['prefill'] * 1e3:10.1f} {r['decode'] * 1e3:9.1f} "
              f"{r['decode_tok_s']:12.1f}")
