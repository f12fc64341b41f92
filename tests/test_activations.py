"""The audio tower's SiLU and sigmoid give MLX's own values, whichever library computes them."""

import platform

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


@pytest.mark.parametrize("view", [lambda base: base.T[1:, ::2], lambda base: mx.split(base, 2, axis=-1)[1]],
                         ids=["transposed, strided", "split half (the tower's gate)"])
def test_views_give_the_values_of_their_own_elements(view):
    base = mx.arange(48, dtype=mx.float32).reshape(6, 8) * 0.5 - 12
    x = view(base)
    np.testing.assert_allclose(np.array(silu(x)), np.array(nn.silu(x)), rtol=1e-6)
    np.testing.assert_allclose(np.array(sigmoid(x)), np.array(mx.sigmoid(x)), rtol=1e-6)


@pytest.mark.skipif(mx.default_device() != mx.cpu or platform.system() == "Darwin",
                    reason="NumPy computes them only where MLX's exp is scalar: its CPU backend off macOS")
@pytest.mark.parametrize("activation", [silu, sigmoid], ids=["silu", "sigmoid"])
def test_on_linux_cpus_float32_goes_through_numpys_exp(activation, monkeypatch):
    calls = []
    exp = np.exp
    monkeypatch.setattr(np, "exp", lambda x: calls.append(x.shape) or exp(x))
    activation(inputs(mx.float32))
    assert calls == [(2, 2057)]
    activation(inputs(mx.bfloat16))  # a dtype NumPy lacks: MLX's own kernel
    assert len(calls) == 1
