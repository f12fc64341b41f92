"""The log-mel front-end matches transformers' Gemma4AudioFeatureExtractor (google settings)."""

from __future__ import annotations


import numpy as np
import pytest


import transformers

from worker.gemma4 import features

CLIP_SECONDS = [0.5, 1.01, 7.3, 29.99, 30.0]


@pytest.fixture(scope="module")
def hf_extractor():
    # processor_config.json of google/gemma-4-E2B-it (spec §1.1).
    return transformers.Gemma4AudioFeatureExtractor(
        feature_size=128,
        sampling_rate=16_000,
        frame_length_ms=20.0,
        hop_length_ms=10.0,
        min_frequency=0.0,
        max_frequency=8000.0,
        preemphasis=0.0,
        preemphasis_htk_flavor=True,
        fft_overdrive=False,
        dither=0.0,
        input_scale_factor=1.0,
        mel_floor=1e-3,
        per_bin_mean=None,
        per_bin_stddev=None,
        padding_value=0.0,
        padding_side="right",
        return_attention_mask=True,
    )


def speechlike(num_samples: int, seed: int) -> np.ndarray:
    """Two drifting tones, noise and a silent gap: non-trivial in every mel band."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / features.SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * t) * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    wave += 0.05 * rng.standard_normal(num_samples)
    wave[num_samples // 3 : num_samples // 3 + 800] = 0.0
    return wave.astype(np.float32)


def hf_log_mel(extractor, waves):
    out = extractor(list(waves), return_tensors="np")
    return out["input_features"], out["input_features_mask"]


def assert_same(ours, ref):
    feats, mask = (np.array(a) for a in ours)
    ref_feats, ref_mask = ref
    assert feats.dtype == np.float32 and mask.dtype == np.bool_
    assert feats.shape == ref_feats.shape
    np.testing.assert_array_equal(mask, ref_mask)
    assert np.abs(feats - ref_feats).max() <= 1e-4


@pytest.mark.parametrize("seconds", CLIP_SECONDS)
def test_single_clip_matches_hf(hf_extractor, seconds):
    wave = speechlike(int(round(seconds * features.SAMPLE_RATE)), seed=int(seconds * 100))
    assert_same(features.log_mel([wave]), hf_log_mel(hf_extractor, [wave]))


def test_batch_of_mixed_lengths_matches_hf(hf_extractor):
    lengths = [8_000, 16_160, 100, 116_800, 480_000, 161]
    waves = [speechlike(n, seed=i) for i, n in enumerate(lengths)]
    assert_same(features.log_mel(waves), hf_log_mel(hf_extractor, waves))


def test_invalid_frames_are_exactly_zero():
    feats, mask = features.log_mel([speechlike(16_000, 0), speechlike(4_000, 1)])
    feats, mask = np.array(feats), np.array(mask)
    assert not mask[1, 30:].any()
    assert np.all(feats[1, ~mask[1]] == 0.0)
    assert np.all(feats[mask] != 0.0)


def test_clip_longer_than_30_s_is_refused():
    with pytest.raises(ValueError, match="480000"):
        features.log_mel([np.zeros(features.MAX_SAMPLES + 1, np.float32)])
    with pytest.raises(ValueError, match="480000"):
        features.audio_token_count(features.MAX_SAMPLES + 1)


def test_mel_filterbank_matches_hf(hf_extractor):
    np.testing.assert_allclose(features.mel_filters(), hf_extractor.mel_filters, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(features.hann_window(), hf_extractor.window)


def hf_token_counts(extractor, lengths):
    """What Gemma4Processor.replace_audio_token inserts: frame mask [::2][::2], summed."""
    _, mask = hf_log_mel(extractor, [np.zeros(n, np.float32) for n in lengths])
    return [int(row[::2][::2].sum()) for row in mask]


def test_audio_token_count_matches_hf_for_short_clips(hf_extractor):
    lengths = list(range(0, 4_000))  # covers n mod 640 in 0..639 several times
    counts = [features.audio_token_count(n) for n in lengths]
    for start in range(0, len(lengths), 1_000):  # a batch masks every clip by its own length
        chunk = lengths[start : start + 1_000]
        assert counts[start : start + 1_000] == hf_token_counts(hf_extractor, chunk)


def test_audio_token_count_matches_hf_at_40_ms_boundaries(hf_extractor):
    lengths = sorted(
        {640 * k + r for k in (25, 114, 467, 749) for r in (0, 1, 2, 80, 159, 160, 161, 320, 639)}
        | {16_160, 479_999, 480_000, features.MAX_SAMPLES - 160}
    )
    lengths = [n for n in lengths if n <= features.MAX_SAMPLES]
    assert [features.audio_token_count(n) for n in lengths] == hf_token_counts(hf_extractor, lengths)


def test_audio_token_count_known_values():
    assert features.audio_token_count(48_000) == 75  # 3 s
    assert features.audio_token_count(16_160) == 25  # 1.01 s: not ceil(1010 / 40) = 26
    assert features.audio_token_count(480_000) == 750  # 30 s
    assert features.audio_token_count(160) == 0
    assert features.audio_token_count(161) == 1
