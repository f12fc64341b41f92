"""A module method's elementwise chain fused into few kernels (``mx.compile``) on a GPU.

A GPU runs a kernel per MLX op, and each reads and writes its whole array. The Conformer's
blocks are long chains of clamps, casts, activations, norms and residual adds around their
matmuls, over [B, T, 1024..4096] arrays. ``mx.compile(shapeless=True)`` fuses each run of
elementwise ops into one kernel, for any batch and length without recompiling (H100: a
tower call of 16-64 clips 24-25 % shorter, its output bit for bit the same;
docs/benchmarks.md). The module's state is an input of the compiled function, not a
constant baked in at the first call, so weights loaded later are the weights used.

A trace (the first call for a new number of dimensions or dtype of the arguments) puts
placeholders in the module's state while it runs and does not put the arrays back if it
raises, an alarm's exception for one: every later call of the module would fail. So the
state is kept aside for the calls that trace and restored if one raises.

On the CPU the methods run op by op: there the tower's float32 activations go through NumPy
(``activations``), which a compiled function cannot call, and a compiled chain is no faster
(MLX's generated CPU kernels still call a scalar ``exp``; docs/benchmarks.md).
Metal fuses like CUDA; it was not measured on a Mac either.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def fusing() -> bool:
    """Whether ``fused`` methods compile: on a GPU (Metal or CUDA)."""
    return mx.default_device() == mx.gpu


def fused(method: Callable) -> Callable:
    """Decorate a module's method that is the same computation for any shape of its arguments.

    It may not read an argument's ``.shape`` (a shapeless trace bakes the first call's in),
    use arrays that are neither arguments nor the module's state (they become constants),
    or leave MLX (NumPy, ``eval``, ``item``).
    """
    slot = f"_fused_{method.__qualname__}"

    @wraps(method)
    def call(self: nn.Module, *args: mx.array) -> mx.array:
        if not fusing():
            return method(self, *args)
        if slot not in self.__dict__:
            self.__dict__[slot] = mx.compile(partial(method, self), inputs=self.state, shapeless=True), set()
        compiled, traced = self.__dict__[slot]
        signature = tuple((a.ndim, a.dtype) for a in args)
        if signature in traced:
            return compiled(*args)
        state = tree_flatten(self.state)
        try:
            out = compiled(*args)
        except BaseException:
            self.update(tree_unflatten(state))
            raise
        traced.add(signature)
        return out

    return call
