"""mlx-community layout: the float copy equals the google layout; 4/8-bit copies generate."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tone
from worker.gemma4.engine import ClipRequest, Engine

CLIPS = [make_tone(s, freq=f, seed=i)[:, 0] for i, (s, f) in enumerate([(0.7, 220), (2.5, 330), (6.1, 610)])]
PROMPT = "Transcribe this audio."


def _first_logits(engine, wave):
    rows, _ = engine.encode([wave])
    ids = engine.prompts.audio_prompt(PROMPT, rows[0].shape[0])
    logits, _ = engine.decoder.prefill(mx.array([ids]), rows[0])
    return np.array(logits[0].astype(mx.float32))


@pytest.fixture(scope="module")
def float_engine(tiny_checkpoint):
    return Engine.load(str(tiny_checkpoint("e2b")))


def test_mlx_layout_float_matches_google_layout(tiny_checkpoint, float_engine):
    mlx_engine = Engine.load(str(tiny_checkpoint("e2b", layout="mlx")))
    for wave in CLIPS:
        assert np.abs(_first_logits(mlx_engine, wave) - _first_logits(float_engine, wave)).max() < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_copy_loads_and_generates(tiny_checkpoint, float_engine, bits, report):
    engine = Engine.load(str(tiny_checkpoint("e2b", layout="mlx", bits=bits)))
    text = engine.model.text
    assert "scales" in dict(text.model.layers[0].mlp.up_proj.parameters())
    assert "scales" in dict(engine.model.embed_audio.embedding_projection.parameters())
    agree, worst = 0, 0.0
    for wave in CLIPS:
        q, f = _first_logits(engine, wave), _first_logits(float_engine, wave)
        agree += int(q.argmax() == f.argmax())
        worst = max(worst, float(np.abs(q - f).max()))
    outputs = engine.run([ClipRequest(w, PROMPT, 8) for w in CLIPS])
    assert all(o.tokens for o in outputs)
    report(f"quantized {bits}-bit affine: first token agrees with float on {agree}/{len(CLIPS)} clips, "
           f"max |Δ logits| {worst:.3f}")
