"""Log-mel front-end of Gemma 4 E2B/E4B (transformers ``Gemma4AudioFeatureExtractor``).

Pure functions over mono 16 kHz float32 clips. The frames are computed in NumPy: on
the CPU it is several times faster than MLX for this size (a 30 s clip takes ~8 ms;
MLX's bundled reference BLAS makes the mel matmul alone ~40 ms), and the result only
becomes an ``mx.array`` at the end. Each clip is computed on its own (``clip_features``),
then a batch is assembled by zero-padding (``batch_features``): the same numbers as one
padded batch, since invalid frames are zero either way.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from worker.audio import SAMPLE_RATE

FRAME_LENGTH = 320  # 20 ms analysis window
HOP_LENGTH = 160  # 10 ms
N_FFT = 2 ** math.ceil(math.log2(FRAME_LENGTH))  # 512
N_MELS = 128
MIN_FREQUENCY = 0.0
MAX_FREQUENCY = 8_000.0
MEL_FLOOR = 1e-3  # additive: ln(mel + MEL_FLOOR)
PAD_MULTIPLE = 128  # batch length is rounded up to a multiple of this
MAX_SAMPLES = 30 * SAMPLE_RATE  # 480 000: the longest clip the model takes
LEFT_PAD = FRAME_LENGTH // 2  # semicausal padding: 160 zeros in front
UNFOLD = FRAME_LENGTH + 1  # HF unfolds 321 samples and drops the last one
TIME_REDUCTION = 4  # the audio tower's two stride-2 convolutions


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """HTK triangular mel filterbank [N_FFT // 2 + 1, N_MELS], float64, unnormalised.

    Triangles are built in Hz on mel-spaced corner points; filter 0 is all zero.
    """

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    corners = mel_to_hz(np.linspace(hz_to_mel(MIN_FREQUENCY), hz_to_mel(MAX_FREQUENCY), N_MELS + 2))
    bins = np.linspace(0.0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    width = np.diff(corners)
    offset = corners[None, :] - bins[:, None]  # [257, 130]
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    """Periodic Hann window of FRAME_LENGTH samples (computed in float64, stored float32)."""
    k = np.arange(FRAME_LENGTH, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / FRAME_LENGTH)).astype(np.float32)


def valid_frame_count(num_samples: int) -> int:
    """Mel frames whose whole 321-sample window lies inside the clip."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_samples <= LEFT_PAD:
        return 0
    return (num_samples - LEFT_PAD - 1) // HOP_LENGTH + 1


def audio_token_count(num_samples: int) -> int:
    """Audio soft tokens the model produces for a clip of ``num_samples`` samples at 16 kHz.

    Equals HF's count (frame mask, every other frame, twice): ceil(V / 4) with V valid
    mel frames; 0 for clips shorter than 161 samples.
    """
    _check_length(num_samples)
    return -(-valid_frame_count(num_samples) // TIME_REDUCTION)


def _check_length(num_samples: int) -> None:
    if num_samples > MAX_SAMPLES:
        raise ValueError(
            f"audio clip has {num_samples} samples; the model takes at most {MAX_SAMPLES} "
            f"({MAX_SAMPLES // SAMPLE_RATE} s at {SAMPLE_RATE} Hz): split it before the front-end"
        )


def clip_features(wave: np.ndarray) -> np.ndarray:
    """Log-mel features [V, N_MELS] float32 of one mono 16 kHz clip's valid frames.

    The costly part of the front-end, and thread-safe (NumPy's FFT and matmul release the
    interpreter lock): the engine runs it for the clips of a batch in parallel. A valid
    frame's window lies inside the clip, so its features do not depend on how the batch
    is padded (``batch_features``).
    """
    clip = np.asarray(wave, dtype=np.float32)
    if clip.ndim != 1:
        raise ValueError(f"expected mono 1-D clips, got shape {clip.shape}")
    _check_length(clip.shape[0])
    valid = valid_frame_count(clip.shape[0])
    signal = np.zeros(LEFT_PAD + clip.shape[0], dtype=np.float32)
    signal[LEFT_PAD:] = clip
    step = signal.strides[0]
    frames = np.lib.stride_tricks.as_strided(signal, shape=(valid, FRAME_LENGTH),  # the 321st sample is never read
                                             strides=(HOP_LENGTH * step, step), writeable=False)
    # float64 FFT: faster than NumPy's float32 path here and at least as accurate.
    spectrum = np.fft.rfft((frames * hann_window()).astype(np.float64), n=N_FFT, axis=-1)
    return np.log(np.abs(spectrum) @ mel_filters() + MEL_FLOOR).astype(np.float32)


def frame_count(num_samples: int, length: int = 0) -> int:
    """Frames T of a batch whose longest clip has ``num_samples`` samples, padded to at least ``length``."""
    padded_len = -(-max(num_samples, length) // PAD_MULTIPLE) * PAD_MULTIPLE
    return max(0, (padded_len + LEFT_PAD - UNFOLD) // HOP_LENGTH + 1)


def batch_features(per_clip: list[np.ndarray], num_frames: int) -> tuple[mx.array, mx.array]:
    """``clip_features`` of a batch, zero-padded to ``num_frames``: features [B, T, N_MELS] and mask [B, T]."""
    features = np.zeros((len(per_clip), num_frames, N_MELS), dtype=np.float32)
    mask = np.zeros((len(per_clip), num_frames), dtype=bool)
    for row, clip in enumerate(per_clip):
        features[row, :clip.shape[0]] = clip
        mask[row, :clip.shape[0]] = True
    return mx.array(features), mx.array(mask)


def log_mel(waves: list[np.ndarray], length: int = 0) -> tuple[mx.array, mx.array]:
    """Log-mel features of a batch of mono 16 kHz clips.

    Args:
        waves: 1-D float arrays (float32 in [-1, 1]), each at most MAX_SAMPLES long.
        length: pad the batch to at least this many samples (a shape bucket, ``shapes.py``).

    Returns:
        features: [B, T, N_MELS] float32, ln(mel + 1e-3), exactly 0.0 on invalid frames.
        mask: [B, T] bool, True where the frame's window is inside the clip (a prefix).
        T = ``frame_count``: (ceil(max(max_len, length) / 128) * 128 - 161) // 160 + 1.
    """
    if len(waves) == 0:
        raise ValueError("log_mel needs at least one clip")
    per_clip = [clip_features(w) for w in waves]
    return batch_features(per_clip, frame_count(max(np.shape(w)[0] for w in waves), length))
