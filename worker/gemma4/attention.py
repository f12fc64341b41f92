"""Decode-step attention with each KV head's query heads laid out as query positions.

mlx-lm's Gemma 4 layers call ``gemma4_text.scaled_dot_product_attention`` with queries
[B, H, 1, D] and keys/values [B, K, W, D] (K KV heads, G = H / K query heads each; E2B:
K = 1, G = 8). Where MLX has no fused kernel for the head dim (its CUDA backend has none
for Gemma 4's 256 and 512, Metal none for 512, the CPU none at all), its fallback
broadcasts every KV head over its G query heads inside two batched matmuls, which run as
B x H separate matrix-vector products. A decode step has one query per head, so the G
heads of a KV head can be its G query positions instead: queries [B, K, G, D] against the
same keys, two plain batched matmuls, the decode mask (one threshold per row, [B, 1, 1, W])
broadcasting over them. The numbers are the same products and sums (bit for bit on the
CPU: tests/test_engine_batching.py); on the H200 a 256-row step took 30 rather than 35 ms,
and 14 with ``WindowCache`` (docs/benchmarks.md, "Anatomy of a decode step").

``install`` puts ``decode_attention`` in mlx-lm's place for this process; everything that
is not such a decode step goes to mlx-lm's own function unchanged.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx_lm.models import gemma4_text

STOCK = gemma4_text.scaled_dot_product_attention
FUSED_DECODE_HEAD_DIMS = {"cuda": (64, 96, 128), "metal": (64, 96, 128, 256)}  # MLX 0.32's vector kernels


@cache
def fused_head_dims() -> tuple[int, ...]:
    if mx.default_device() == mx.cpu:
        return ()
    return FUSED_DECODE_HEAD_DIMS["cuda" if mx.cuda.is_available() else "metal"]


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, cache, scale: float,
                     mask: mx.array | str | None, sinks: mx.array | None = None) -> mx.array:
    rows, heads, new, dim = queries.shape
    groups = heads // keys.shape[1]
    if (new != 1 or groups == 1 or isinstance(mask, str) or sinks is not None or hasattr(cache, "bits")
            or dim in fused_head_dims()):
        return STOCK(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    out = mx.fast.scaled_dot_product_attention(queries.reshape(rows, keys.shape[1], groups, dim), keys, values,
                                               scale=scale, mask=mask)
    return out.reshape(rows, heads, 1, dim)


def install() -> None:
    """Route mlx-lm's Gemma 4 attention through ``decode_attention`` (idempotent)."""
    gemma4_text.scaled_dot_product_attention = decode_attention
