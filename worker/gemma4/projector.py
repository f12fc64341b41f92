"""Audio → text-space projector of Gemma 4 (HF ``embed_audio``) and valid-row selection."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class AudioEmbedder(nn.Module):
    """Scale-free RMSNorm (float32, eps 1e-6), then ``embedding_projection`` (no bias).

    [..., audio_dims] → [..., text_hidden_size]. No sqrt(H) scaling: audio soft tokens
    go into the text sequence as they come out of here. ``embedding_projection`` is a
    plain ``nn.Linear`` so ``nn.quantize`` can turn it into the mlx-community 4/8-bit form.
    """

    def __init__(self, audio_dims: int = 1536, text_hidden_size: int = 1536, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(audio_dims, text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)
        return self.embedding_projection(x)


def valid_rows(out: mx.array, mask: mx.array) -> mx.array:
    """Rows of ``out`` [B, N, H] where ``mask`` [B, N] is True, clip after clip: [Σ valid, H].

    Same order as HF's ``out[mask]``. Evaluates ``mask`` (cheap) but not ``out``.
    """
    batch, steps, hidden = out.shape
    keep = np.flatnonzero(np.array(mask).reshape(-1))
    return mx.take(out.reshape(batch * steps, hidden), mx.array(keep, dtype=mx.int32), axis=0)
