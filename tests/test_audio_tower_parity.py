"""The MLX audio tower and projector match transformers' Gemma4AudioModel / embed_audio.

A small float32 tower (every structural feature of E2B, narrow widths) with every weight
randomised — norm weights, per_dim_scale and finite clip bounds included, some of them
active — is copied through ``sanitize_audio`` exactly as the loader would.
"""

from __future__ import annotations


import numpy as np
import pytest


import torch

import mlx.core as mx
import mlx.nn as nn
from transformers.models.gemma4.configuration_gemma4 import (
    Gemma4AudioConfig,
    Gemma4TextConfig,
)
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4AudioModel,
    Gemma4MultimodalEmbedder,
)

from worker.gemma4 import audio_tower, features, fusion
from worker.gemma4.audio_tower import AudioConfig, AudioTower, sanitize_audio
from worker.gemma4.projector import AudioEmbedder, valid_rows

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    subsampling_conv_channels=[128, 8],
    output_proj_dims=64,
)
TEXT_HIDDEN = 96
CLIP_SECONDS = [0.5, 1.01, 7.3, 29.99, 30.0]
TOLERANCE = 1e-4  # max |Δ| relative to max |ref|


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values for every tensor; clip bounds finite, in a range where some bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith(("input_min", "output_min")):
                t.copy_(-(0.8 + 2.0 * torch.rand((), generator=gen)))
            elif name.endswith(("input_max", "output_max")):
                t.copy_(0.8 + 2.0 * torch.rand((), generator=gen))
            elif name.endswith("per_dim_scale"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif t.ndim == 1:  # norm weights, output_proj bias
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:  # linear / conv weights, fan-in scaled
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * fan_in**-0.5)


def hf_tower_of(params: dict):
    config = Gemma4AudioConfig(**params)
    config._attn_implementation = "eager"
    model = Gemma4AudioModel(config).eval()
    randomise(model, seed=0)
    return model


@pytest.fixture(scope="module")
def hf_tower():
    return hf_tower_of(SMALL)


def checkpoint_of(hf_model) -> dict[str, mx.array]:
    """The tower's tensors as the loader hands them over: ``model.`` stripped."""
    return {f"audio_tower.{k}": mx.array(v.numpy()) for k, v in hf_model.state_dict().items()}


def mlx_tower_from(weights: dict[str, mx.array], params: dict = SMALL) -> AudioTower:
    tower = AudioTower(AudioConfig.from_dict(params))
    sanitized = sanitize_audio(weights)
    prefix = "audio_tower."
    tower.load_weights([(k[len(prefix) :], v) for k, v in sanitized.items() if k.startswith(prefix)])
    return tower


@pytest.fixture(scope="module")
def mlx_tower(hf_tower):
    return mlx_tower_from(checkpoint_of(hf_tower))


def speechlike(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / features.SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * t) * t) + 0.05 * rng.standard_normal(num_samples)
    return wave.astype(np.float32)


def run_hf(model, feats: mx.array, mask: mx.array):
    with torch.no_grad():
        out = model(
            input_features=torch.from_numpy(np.array(feats)),
            attention_mask=torch.from_numpy(np.array(mask)),
        )
    return out.last_hidden_state.numpy(), out.attention_mask.numpy()


def run_mlx(tower, feats, mask):
    out, out_mask = tower(feats, mask)
    return np.array(out), np.array(out_mask)


def assert_valid_rows_match(ours, ref):
    out, mask = ours
    ref_out, ref_mask = ref
    assert out.shape == ref_out.shape
    np.testing.assert_array_equal(mask, ref_mask)
    scale = np.abs(ref_out[ref_mask]).max()
    assert np.abs(out[mask] - ref_out[ref_mask]).max() <= TOLERANCE * scale


@pytest.mark.parametrize("seconds", CLIP_SECONDS)
def test_single_clip_matches_hf(hf_tower, mlx_tower, seconds):
    feats, mask = features.log_mel([speechlike(int(round(seconds * 16_000)), seed=1)])
    assert_valid_rows_match(run_mlx(mlx_tower, feats, mask), run_hf(hf_tower, feats, mask))


def test_batch_with_different_valid_lengths_matches_hf(hf_tower, mlx_tower):
    lengths = [16_160, 116_800, 8_000, 48_123]
    feats, mask = features.log_mel([speechlike(n, seed=i) for i, n in enumerate(lengths)])
    ours, ref = run_mlx(mlx_tower, feats, mask), run_hf(hf_tower, feats, mask)
    assert_valid_rows_match(ours, ref)
    assert ours[1].sum(axis=1).tolist() == [features.audio_token_count(n) for n in lengths]


@pytest.mark.parametrize("horizons", [
    dict(attention_chunk_size=5, attention_context_left=9, attention_context_right=0),
    dict(attention_chunk_size=4, attention_context_left=9, attention_context_right=2),
    dict(attention_chunk_size=4, attention_context_left=9, attention_context_right=4),
], ids=["past-not-whole-blocks", "future-not-whole-blocks", "whole-blocks-past-and-future"])
def test_other_attention_horizons_match_hf(horizons):
    """E2B's horizons are whole blocks (12 past, none ahead): its keys are copied block by block. Other
    horizons gather them by index; both ways, with a look-ahead too, are the reference's attention."""
    params = {**SMALL, **horizons}
    hf = hf_tower_of(params)
    lengths = [16_160, 48_123, 8_000]
    feats, mask = features.log_mel([speechlike(n, seed=i) for i, n in enumerate(lengths)])
    assert_valid_rows_match(run_mlx(mlx_tower_from(checkpoint_of(hf), params), feats, mask), run_hf(hf, feats, mask))


def test_batched_clip_equals_clip_alone(mlx_tower):
    short, long = speechlike(16_160, seed=3), speechlike(116_800, seed=4)
    out, mask = run_mlx(mlx_tower, *features.log_mel([long, short]))
    alone, alone_mask = run_mlx(mlx_tower, *features.log_mel([short]))
    np.testing.assert_allclose(out[1][mask[1]], alone[0][alone_mask[0]], rtol=0, atol=1e-5)


def test_bf16_tower_stays_bf16_and_within_rounding_noise_of_hf_bf16(hf_tower):
    """Real checkpoints are bf16: same dtype policy as HF, so only bf16 rounding differs."""
    hf_bf16 = Gemma4AudioModel(hf_tower.config).eval()
    hf_bf16.load_state_dict(hf_tower.state_dict())
    hf_bf16.to(torch.bfloat16)
    weights = {
        f"audio_tower.{k}": mx.array(v.float().numpy()).astype(mx.bfloat16)
        for k, v in hf_bf16.state_dict().items()
    }
    tower = mlx_tower_from(weights)
    feats, mask = features.log_mel([speechlike(116_800, seed=2)])
    out, out_mask = tower(feats, mask)
    assert out.dtype == mx.bfloat16
    with torch.no_grad():
        ref = hf_bf16(
            input_features=torch.from_numpy(np.array(feats)),
            attention_mask=torch.from_numpy(np.array(mask)),
        ).last_hidden_state.float().numpy()
    diff = np.abs(np.array(out.astype(mx.float32)) - ref)[np.array(out_mask)]
    scale = np.abs(ref).max()
    assert diff.max() <= 5e-2 * scale and diff.mean() <= 5e-3 * scale


def bf16_weights(hf_model) -> dict[str, mx.array]:
    return {k: v.astype(mx.bfloat16) for k, v in checkpoint_of(hf_model).items()}


def test_fused_tower_as_on_a_gpu_gives_the_same_bits_for_any_batch_and_takes_weights_loaded_later(
        hf_tower, monkeypatch):
    """On a GPU the tower's elementwise chains run compiled (``fusion``); in bf16 the CPU compiles them too.

    One compiled function serves every batch size, length and padding: the first call's
    shapes must not stick.
    """
    batches = [features.log_mel([speechlike(48_123, seed=6), speechlike(16_160, seed=7)]),
               features.log_mel([speechlike(n, seed=n) for n in (8_000, 116_800, 3_300)]),
               features.log_mel([speechlike(4_000, seed=8)])]
    tower = mlx_tower_from(bf16_weights(hf_tower))
    plain = [tower(feats, mask)[0] for feats, mask in batches]
    monkeypatch.setattr(fusion, "fusing", lambda: True)
    for (feats, mask), expected in zip(batches, plain):
        assert mx.array_equal(tower(feats, mask)[0], expected).item()

    other = Gemma4AudioModel(hf_tower.config).eval()
    randomise(other, seed=1)
    prefix = "audio_tower."
    tower.load_weights([(k[len(prefix):], v) for k, v in sanitize_audio(bf16_weights(other)).items()
                        if k.startswith(prefix)])
    feats, mask = batches[0]
    fused_after_loading = tower(feats, mask)[0]
    monkeypatch.setattr(fusion, "fusing", lambda: False)
    assert mx.array_equal(fused_after_loading, mlx_tower_from(bf16_weights(other))(feats, mask)[0]).item()
    assert not mx.array_equal(fused_after_loading, plain[0]).item()


class Interrupted(BaseException):
    """Stands for an alarm's exception (a job's hard time limit) landing while a method is traced."""


def test_a_trace_interrupted_midway_leaves_the_tower_whole(hf_tower, monkeypatch):
    feats, mask = features.log_mel([speechlike(16_160, seed=9)])
    tower = mlx_tower_from(bf16_weights(hf_tower))
    plain = tower(feats, mask)[0]
    monkeypatch.setattr(fusion, "fusing", lambda: True)

    def interrupted(x):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(audio_tower, "silu", interrupted)  # inside the feed-forward block's trace
        with pytest.raises(Interrupted):
            tower(feats, mask)
    assert mx.array_equal(tower(feats, mask)[0], plain).item()


def test_clip_bounds_are_active_in_the_reference(hf_tower):
    """Guard for the parity tests: resetting the bounds to ±inf changes HF's output."""
    feats, mask = features.log_mel([speechlike(48_000, seed=5)])
    clipped, _ = run_hf(hf_tower, feats, mask)
    state = {k: v.clone() for k, v in hf_tower.state_dict().items()}
    with torch.no_grad():
        for name, t in hf_tower.state_dict().items():
            if name.endswith(("_min", "_max")):
                t.fill_(float("inf") if name.endswith("_max") else float("-inf"))
    try:
        unclipped, _ = run_hf(hf_tower, feats, mask)
    finally:
        hf_tower.load_state_dict(state)
    assert np.abs(clipped - unclipped).max() > 100 * TOLERANCE * np.abs(clipped).max()


def test_mlx_community_layout_loads_to_the_same_tower(hf_tower, mlx_tower):
    """Channels-last convs (as mlx-vlm saves them) give the very same parameters."""
    weights = checkpoint_of(hf_tower)
    for name, w in list(weights.items()):
        if name.endswith(".conv.weight"):
            weights[name] = w.transpose(0, 2, 3, 1)  # [Cout, Cin, 3, 3] → [Cout, 3, 3, Cin]
        elif name.endswith("depthwise_conv1d.weight"):
            weights[name] = w.transpose(0, 2, 1)  # [C, 1, K] → [C, K, 1]
    weights["language_model.model.norm.weight"] = mx.ones((8,))  # not ours: dropped
    community = mlx_tower_from(weights)
    feats, mask = features.log_mel([speechlike(48_000, seed=6)])
    np.testing.assert_array_equal(run_mlx(community, feats, mask)[0], run_mlx(mlx_tower, feats, mask)[0])


def test_sanitize_keeps_only_tower_and_projector():
    weights = {
        "audio_tower.output_proj.bias": mx.zeros((4,)),
        "audio_tower.rel_pos_enc.inv_timescales": mx.zeros((1, 1, 4)),
        "embed_audio.embedding_projection.weight": mx.zeros((4, 4)),
        "language_model.model.embed_tokens.weight": mx.zeros((4, 4)),
        "vision_tower.encoder.weight": mx.zeros((4,)),
    }
    assert sorted(sanitize_audio(weights)) == [
        "audio_tower.output_proj.bias",
        "embed_audio.embedding_projection.weight",
    ]


def test_audio_config_ignores_unknown_keys_and_defaults_to_e2b():
    config = AudioConfig.from_dict({"hidden_size": 1024, "model_type": "gemma4_audio", "dtype": "bfloat16"})
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 12, 8)
    assert config.subsampling_conv_channels == (128, 32)
    assert config.output_proj_dims == 1536 and config.context_size == 24 and config.max_past == 12


@pytest.fixture(scope="module")
def hf_embedder():
    audio = Gemma4AudioConfig(**SMALL)
    embedder = Gemma4MultimodalEmbedder(audio, Gemma4TextConfig(hidden_size=TEXT_HIDDEN)).eval()
    randomise(embedder, seed=1)
    return embedder


def test_embedder_matches_hf_on_valid_rows(hf_tower, mlx_tower, hf_embedder):
    lengths = [16_160, 48_000, 8_000]
    feats, mask = features.log_mel([speechlike(n, seed=7 + i) for i, n in enumerate(lengths)])
    with torch.no_grad():
        out = hf_tower(
            input_features=torch.from_numpy(np.array(feats)),
            attention_mask=torch.from_numpy(np.array(mask)),
        )
        # Gemma4Model: embed_audio over the tower output, then keep the masked rows.
        ref = hf_embedder(out.last_hidden_state)[out.attention_mask].numpy()

    embedder = AudioEmbedder(SMALL["output_proj_dims"], TEXT_HIDDEN)
    weights = sanitize_audio({f"embed_audio.{k}": mx.array(v.numpy()) for k, v in hf_embedder.state_dict().items()})
    embedder.load_weights([(k[len("embed_audio.") :], v) for k, v in weights.items()])
    tower_out, tower_mask = mlx_tower(feats, mask)
    ours = np.array(embedder(valid_rows(tower_out, tower_mask)))

    assert ours.shape == (sum(features.audio_token_count(n) for n in lengths), TEXT_HIDDEN)
    assert np.abs(ours - ref).max() <= TOLERANCE * np.abs(ref).max()


def test_valid_rows_keeps_masked_rows_clip_after_clip():
    out = mx.arange(2 * 3 * 2).reshape(2, 3, 2)
    mask = mx.array([[True, True, False], [True, False, False]])
    assert np.array(valid_rows(out, mask)).tolist() == [[0, 1], [2, 3], [6, 7]]


def test_quantized_projector_loads_mlx_community_names():
    source = AudioEmbedder(128, TEXT_HIDDEN)
    nn.quantize(source, group_size=64, bits=4)
    saved = {f"embed_audio.{k}": v for k, v in dict(_flatten(source.parameters())).items()}
    assert set(saved) == {
        "embed_audio.embedding_projection.weight",
        "embed_audio.embedding_projection.scales",
        "embed_audio.embedding_projection.biases",
    }
    target = AudioEmbedder(128, TEXT_HIDDEN)
    nn.quantize(target, group_size=64, bits=4)
    target.load_weights([(k[len("embed_audio.") :], v) for k, v in sanitize_audio(saved).items()])
    x = mx.random.normal((5, 128))
    np.testing.assert_array_equal(np.array(target(x)), np.array(source(x)))


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
