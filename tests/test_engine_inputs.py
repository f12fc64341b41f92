"""Bad clips and bad checkpoints give a specific error, never a crash or a silent result."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tone
from producer.failures import AudioqError, FailureCode
from worker.gemma4.engine import ClipRequest, Engine, Prompt


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.load(str(tiny_checkpoint("e2b")))


def _run(engine, samples):
    return engine.run([ClipRequest(np.asarray(samples, dtype=np.float32), "Transcribe.", 4)])


@pytest.mark.parametrize("samples, code", [
    (np.zeros(0), FailureCode.EMPTY_AUDIO),
    (np.full(160, 0.1), FailureCode.EMPTY_AUDIO),  # shorter than one mel window
    (np.r_[np.zeros(8000), np.nan, np.zeros(8000)], FailureCode.CORRUPT_AUDIO),
    (np.r_[np.zeros(8000), np.inf], FailureCode.CORRUPT_AUDIO),
    (np.zeros(480_001), FailureCode.AUDIO_TOO_LONG),
    (np.zeros((100, 2)), FailureCode.INVALID_REQUEST),
])
def test_bad_clip_is_refused_with_its_code(engine, samples, code):
    with pytest.raises(AudioqError) as err:
        _run(engine, samples)
    assert err.value.code == code
    assert err.value.message


def test_shortest_valid_clip_runs(engine):
    (out,) = _run(engine, make_tone(161 / 16000)[:, 0])
    assert out.audio_tokens == 1


def test_a_batch_gives_the_same_tokens_as_single_clips(engine):
    clips = [make_tone(s, freq=f, seed=i)[:, 0] for i, (s, f) in enumerate([(1.3, 300), (4.0, 500)])]
    batch = engine.run([ClipRequest(c, "Transcribe.", 12) for c in clips])
    single = [engine.run([ClipRequest(c, "Transcribe.", 12)])[0] for c in clips]
    assert [o.tokens for o in batch] == [o.tokens for o in single]
    assert [o.audio_tokens for o in batch] == [33, 100]


@pytest.mark.parametrize("extra", [-1, 1])
def test_placeholder_and_encoder_row_counts_must_agree(engine, extra):
    rows, _ = engine.encode([make_tone(2.0)[:, 0]])
    ids = engine.prompts.audio_prompt("Transcribe.", rows[0].shape[0] + extra)
    with pytest.raises(AudioqError) as err:
        engine.first_logits([Prompt(ids, rows[0])])
    assert err.value.code == FailureCode.MODEL_ERROR and "placeholders" in err.value.message


def test_model_without_audio_tower_is_refused_at_load(tiny_checkpoint):
    path = tiny_checkpoint("e2b", with_audio=False)
    with pytest.raises(AudioqError) as err:
        Engine.load(str(path))
    assert err.value.code == FailureCode.MODEL_ERROR
    assert str(path) in err.value.message and "no audio tower" in err.value.message


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_checkpoint_missing_a_file_is_named(tiny_checkpoint, tmp_path, missing):
    broken = shutil.copytree(tiny_checkpoint("e2b"), tmp_path / "ckpt")
    (broken / missing).unlink()
    with pytest.raises(AudioqError) as err:
        Engine.load(str(broken))
    assert err.value.code == FailureCode.MODEL_ERROR
    assert (missing if missing != "model.safetensors" else "safetensors") in err.value.message


@pytest.mark.parametrize("tensor", [
    "model.audio_tower.layers.0.self_attn.q_proj.linear.weight",
    "model.audio_tower.layers.1.feed_forward1.ffw_layer_1.input_max",
    "model.language_model.layers.3.mlp.down_proj.weight",
    "model.embed_audio.embedding_projection.weight",
])
def test_checkpoint_missing_a_tensor_is_named(tiny_checkpoint, tmp_path, tensor):
    broken = shutil.copytree(tiny_checkpoint("e2b"), tmp_path / "ckpt")
    weights = mx.load(str(broken / "model.safetensors"))
    assert tensor in weights
    del weights[tensor]
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    with pytest.raises(AudioqError) as err:
        Engine.load(str(broken))
    short = tensor.removeprefix("model.").split(".", 1)[1]
    assert short in err.value.message


def test_sharded_checkpoint_missing_a_shard_is_named(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("e2b", shard_size=1_000_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert Engine.load(str(path)).model.audio_tower is not None
    broken = shutil.copytree(path, tmp_path / "ckpt")
    (broken / shards[-1]).unlink()
    with pytest.raises(AudioqError) as err:
        Engine.load(str(broken))
    assert shards[-1] in err.value.message


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(AudioqError) as err:
        Engine.load(str(tmp_path / "nowhere"))
    assert "no such checkpoint directory" in err.value.message


def test_vision_weights_are_skipped(tiny_checkpoint, tmp_path):
    """Real E2B/E4B checkpoints carry a vision tower; the audio engine loads without it."""
    ckpt = shutil.copytree(tiny_checkpoint("e2b"), tmp_path / "ckpt")
    weights = mx.load(str(ckpt / "model.safetensors"))
    weights["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = mx.zeros((8, 8))
    weights["model.embed_vision.embedding_projection.weight"] = mx.zeros((64, 8))
    mx.save_safetensors(str(ckpt / "model.safetensors"), weights)
    (out,) = Engine.load(str(ckpt)).run([ClipRequest(make_tone(1.0)[:, 0], "Transcribe.", 3)])
    assert out.audio_tokens == 25


def test_thought_channel_is_stripped_from_the_reply(engine):
    prompts = engine.prompts
    text_ids = engine.model.tokenizer.encode("hello there", add_special_tokens=False).ids
    thought = [prompts.channel_open] + engine.model.tokenizer.encode(
        "thought\nlet me think", add_special_tokens=False).ids + [prompts.channel_close]
    assert prompts.reply_text(thought + text_ids) == prompts.reply_text(text_ids) == "hello there"
    assert prompts.reply_text([prompts.channel_open] + text_ids) != ""  # unclosed: kept, not lost


def test_text_only_conversion_of_an_audio_model_is_explained(tiny_checkpoint, tmp_path):
    """mlx-lm converts Gemma 4 text-only but keeps config.json's audio_config."""
    ckpt = shutil.copytree(tiny_checkpoint("e2b"), tmp_path / "ckpt")
    weights = mx.load(str(ckpt / "model.safetensors"))
    text_only = {k: v for k, v in weights.items() if not k.startswith(("model.audio_tower.", "model.embed_audio."))}
    mx.save_safetensors(str(ckpt / "model.safetensors"), text_only)
    with pytest.raises(AudioqError) as err:
        Engine.load(str(ckpt))
    assert "no audio_tower weights" in err.value.message and "text-only" in err.value.message
