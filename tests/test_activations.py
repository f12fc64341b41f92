"""The audio tower's SiLU and sigmoid give MLX's own values, whichever library computes them."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from worker.gemma4.activations import sigmoid, silu

EDGES = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 20.0, -20.0, 87.0, -87.0, 89.0, -89.0, 104.0, -104.0,
         1e30, -1e30, 3.4e38, -3.4e38]


def inputs(dtype: mx.Dtype) -> mx.array:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 8, 4096), EDGES]).astype(np.float32)
    return mx.array(values).reshape(2, -1).astype(dtype)


@pytest.mark.parametrize("ours, theirs", [(silu, nn.silu), (sigmoid, mx.sigmoid)], ids=["silu", "sigmoid"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
def test_activation_matches_mlx(ours, theirs, dtype):
    x = inputs(dtype)
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                               rtol=1e-5 if dtype == mx.float32 else 1e-2, atol=1e-30)


@pytest.mark.parametrize("ours, theirs", [(silu, nn.silu), (sigmoid, mx.sigmoid)], ids=["silu", "sigmoid"])
def test_non_finite_inputs_give_what_mlx_gives(ours, theirs):
    x = mx.array([np.inf, -np.inf, np.nan], dtype=mx.float32)
    np.testing.assert_array_equal(np.array(ours(x)), np.array(theirs(x)))


def test_a_lazy_strided_input_is_evaluated_in_place_of_its_view():
    base = mx.arange(24, dtype=mx.float32).reshape(4, 6) - 12
    view = base.T[1:, ::2] * 0.5  # lazy, transposed, strided
    np.testing.assert_allclose(np.array(silu(view)), np.array(nn.silu(view)), rtol=1e-6)
