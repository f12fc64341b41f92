"""mlx-community layout: the float copy equals the google layout; quantized copies load exactly
(every mode MLX has: affine 4/8-bit, mxfp4, nvfp4, mxfp8, with a per-module override) and generate."""

from __future__ import annotations

import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_tone
from worker.gemma4.engine import ClipRequest, Engine

CLIPS = [make_tone(s, freq=f, seed=i)[:, 0] for i, (s, f) in enumerate([(0.7, 220), (2.5, 330), (6.1, 610)])]
PROMPT = "Transcribe this audio."


def _first_logits(engine, wave):
    return engine.first_logits([engine.prompt(ClipRequest(wave, PROMPT, 1))])[0]


def _quantize_in_memory(engine, mode, bits, group_size):
    override = (mode, bits) == ("affine", 4)

    def recipe(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if override and path == "model.layers.0.mlp.gate_proj":
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        return {"group_size": group_size, "bits": bits, "mode": mode}

    nn.quantize(engine.model.text, class_predicate=recipe)
    nn.quantize(engine.model.embed_audio, class_predicate=recipe)


@pytest.fixture(scope="module")
def float_engine(tiny_checkpoint):
    return Engine.load(str(tiny_checkpoint("e2b")))


def test_mlx_layout_float_matches_google_layout(tiny_checkpoint, float_engine):
    mlx_engine = Engine.load(str(tiny_checkpoint("e2b", layout="mlx")))
    for wave in CLIPS:
        assert np.abs(_first_logits(mlx_engine, wave) - _first_logits(float_engine, wave)).max() < 1e-5


@pytest.mark.parametrize("mode, bits, group_size", [
    ("affine", 8, 64), ("affine", 4, 64), ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_quantized_copy_loads_and_generates(tiny_checkpoint, float_engine, mode, bits, group_size, report):
    engine = Engine.load(str(tiny_checkpoint("e2b", layout="mlx", bits=bits, mode=mode, group_size=group_size)))
    text = engine.model.text
    up = text.model.layers[0].mlp.up_proj
    assert "scales" in dict(up.parameters()) and (up.mode, up.bits, up.group_size) == (mode, bits, group_size)
    assert "scales" in dict(engine.model.embed_audio.embedding_projection.parameters())
    assert "scales" in dict(text.model.embed_tokens_per_layer.parameters())
    if (mode, bits) == ("affine", 4):  # the builder records a per-module 8-bit override
        assert text.model.layers[0].mlp.gate_proj.bits == 8
    # Exact check of the loader: MLX quantizing the float model in memory with the same
    # recipe (and the builder's one 8-bit override) must give the same logits.
    reference = Engine.load(str(tiny_checkpoint("e2b", layout="mlx")))
    _quantize_in_memory(reference, mode, bits, group_size)
    agree, worst, corr = 0, 0.0, []
    for wave in CLIPS:
        q, f = _first_logits(engine, wave), _first_logits(float_engine, wave)
        assert np.abs(q - _first_logits(reference, wave)).max() < 1e-4
        agree += int(q.argmax() == f.argmax())
        worst = max(worst, float(np.abs(q - f).max()))
        corr.append(float(np.corrcoef(q, f)[0, 1]))
    outputs = engine.run([ClipRequest(w, PROMPT, 8) for w in CLIPS])
    assert all(o.tokens for o in outputs)
    report(f"quantized {mode} {bits}-bit (group {group_size}): first token agrees with float on {agree}/{len(CLIPS)} clips, "
           f"max |Δ logits| {worst:.3f}, logit correlation ≥ {min(corr):.3f}")
