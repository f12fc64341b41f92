"""A module method's elementwise chain fused into few kernels (``mx.compile``) on a GPU.

A GPU runs a kernel per MLX op, and each reads and writes its whole array. The Conformer's
blocks are long chains of clamps, casts, activations, norms and residual adds around their
matmuls, over [B, T, 1024..4096] arrays. ``mx.compile(shapeless=True)`` fuses each run of
elementwise ops into one kernel, for any batch and length without recompiling (H100: the
tower 14–17 % faster, its output bit for bit the same; docs/benchmarks.md). The method's
module state is an input of the compiled function, not a constant baked in at the first
call, so weights loaded later are the weights used.

On the CPU the methods run op by op: there the tower's activations go through NumPy
(``activations``), which a compiled function cannot call, and fusing saves no launches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps

import mlx.core as mx
import mlx.nn as nn


def fusing() -> bool:
    """Whether ``fused`` methods compile: on a GPU (Metal or CUDA)."""
    return mx.default_device() == mx.gpu


def fused(method: Callable) -> Callable:
    """Decorate a module's method whose body is shape-agnostic (no reshape, split or slice)."""
    slot = f"_fused_{method.__name__}"

    @wraps(method)
    def call(self: nn.Module, *args: mx.array) -> mx.array:
        if not fusing():
            return method(self, *args)
        compiled = self.__dict__.get(slot)
        if compiled is None:
            compiled = mx.compile(partial(method, self), inputs=self.state, shapeless=True)
            self.__dict__[slot] = compiled
        return compiled(*args)

    return call
