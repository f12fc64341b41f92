"""The tiny random Gemma 4 checkpoint builder (scripts/make_tiny_checkpoint.py) makes real checkpoints.

Everything else in the suite trusts these files to look like google's and mlx-community's,
so these tests read them back with transformers, tokenizers and mlx.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from make_tiny_checkpoint import (
    PRESETS,
    SPECIAL_TOKENS,
    build_checkpoint,
    main,
)

import torch
import mlx.core as mx

from safetensors import safe_open
from tokenizers import Tokenizer


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_hf(path: Path):
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )


@pytest.fixture(scope="module")
def hf_e2b(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf_e2b"), "e2b", seed=0)


@pytest.fixture(scope="module")
def mlx_q4(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("mlx_q4"), "e2b", seed=0, layout="mlx", bits=4)


# ----------------------------------------------------------------------------- hf layout


@pytest.mark.parametrize("preset", ["e2b", "e4b", "wide"])
def test_hf_layout_loads_in_transformers_with_no_missing_or_unexpected_keys(preset, hf_e2b, tmp_path):
    path = hf_e2b if preset == "e2b" else build_checkpoint(tmp_path / preset, preset)
    model, info = load_hf(path)

    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    keys = read_hf_tensors(path).keys()
    assert {k.split(".")[1] for k in keys} == {"language_model", "audio_tower", "embed_audio"}
    assert all(k.startswith("model.") for k in keys)  # no lm_head: tied to embed_tokens


@pytest.mark.parametrize(
    "preset, period, double_wide",
    [("e2b", 5, True), ("e4b", 6, False), ("wide", 5, True)],
)
def test_presets_keep_the_real_structural_features(preset, period, double_wide, hf_e2b, tmp_path):
    path = hf_e2b if preset == "e2b" else build_checkpoint(tmp_path / preset, preset)
    cfg = json.loads((path / "config.json").read_text())
    text, audio = cfg["text_config"], cfg["audio_config"]

    types = text["layer_types"]
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [
        i for i in range(len(types)) if i % period == period - 1
    ]
    assert text["global_head_dim"] != text["head_dim"]
    assert text["hidden_size_per_layer_input"] > 0
    assert text["use_double_wide_mlp"] is double_wide
    assert text["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    assert text["final_logit_softcapping"] == 30.0
    assert audio["subsampling_conv_channels"][0] == 128
    assert (audio["attention_chunk_size"], audio["attention_context_left"],
            audio["attention_context_right"]) == (12, 13, 0)

    # KV sharing has one sliding and one full producer before the shared block.
    first_shared = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    assert 0 < first_shared < text["num_hidden_layers"]
    assert set(types[:first_shared]) == {"sliding_attention", "full_attention"}
    model, _ = load_hf(path)
    modes = model.config.text_config.kv_sharing_modes
    assert modes.count("store") == 2 and modes[first_shared:] == ["reuse"] * (len(types) - first_shared)
    layers = model.model.language_model.layers
    assert [layer.self_attn.head_dim for layer in layers] == [
        text["global_head_dim"] if t == "full_attention" else text["head_dim"] for t in types
    ]
    widths = {layer.mlp.gate_proj.out_features for layer in layers[first_shared:]}
    assert widths == {text["intermediate_size"] * (2 if double_wide else 1)}


def test_text_only_checkpoint_has_no_audio_config_or_weights(tmp_path):
    path = build_checkpoint(tmp_path / "text", "e2b", with_audio=False)

    assert json.loads((path / "config.json").read_text())["audio_config"] is None
    assert not [k for k in read_hf_tensors(path) if "audio" in k]
    _, info = load_hf(path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_json_side_files_carry_the_google_values(hf_e2b):
    gen = json.loads((hf_e2b / "generation_config.json").read_text())
    proc = json.loads((hf_e2b / "processor_config.json").read_text())

    assert (gen["bos_token_id"], gen["pad_token_id"], gen["eos_token_id"]) == (2, 0, [1, 106, 50])
    assert (gen["do_sample"], gen["top_k"], gen["top_p"]) == (True, 64, 0.95)
    assert (proc["audio_seq_length"], proc["audio_ms_per_token"]) == (750, 40)
    fe = proc["feature_extractor"]
    assert fe["feature_extractor_type"] == "Gemma4AudioFeatureExtractor"
    assert (fe["feature_size"], fe["sampling_rate"], fe["frame_length"], fe["hop_length"],
            fe["fft_length"], fe["fft_overdrive"], fe["mel_floor"]) == (128, 16000, 320, 160, 512, False, 0.001)


def test_build_is_deterministic_for_a_preset_and_seed(hf_e2b, tmp_path):
    again = build_checkpoint(tmp_path / "again", "e2b", seed=0)
    other = build_checkpoint(tmp_path / "other", "e2b", seed=1)

    assert (again / "model.safetensors").read_bytes() == (hf_e2b / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (hf_e2b / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (hf_e2b / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- tokenizer


def test_special_tokens_sit_at_the_ids_the_config_names(hf_e2b):
    tok = Tokenizer.from_file(str(hf_e2b / "tokenizer.json"))
    cfg = json.loads((hf_e2b / "config.json").read_text())

    assert tok.get_vocab_size(with_added_tokens=True) <= cfg["text_config"]["vocab_size"]
    for token_id, text in SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == token_id, text
    named = {
        "audio_token_id": "<|audio|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
        "eoa_token_id": "<audio|>", "image_token_id": "<|image|>", "video_token_id": "<|video|>",
        "boi_token_id": "<|image>", "eoi_token_id": "<image|>",
    }
    for key, text in named.items():
        assert cfg[key] == tok.token_to_id(text), key
    text_cfg = cfg["text_config"]
    assert (text_cfg["pad_token_id"], text_cfg["eos_token_id"], text_cfg["bos_token_id"]) == (0, 1, 2)
    assert (tok.token_to_id("<|turn>"), tok.token_to_id("<turn|>")) == (105, 106)


def test_tokenizer_round_trips_text_and_keeps_markers_whole(hf_e2b):
    tok = Tokenizer.from_file(str(hf_e2b / "tokenizer.json"))
    text = "Please transcribe this recording.\nIt's 3 o'clock,  café ✓ 日本"

    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text)  # merges, not one token per character
    prompt = "<|turn>user\nHi<|audio><|audio|><|audio|><audio|><turn|>\n<|turn>model\n"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids[:1] == [105] and ids.count(500) == 2 and 501 in ids and 502 in ids and 106 in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.encode("hi").ids[0] == 2  # like google's, encoding adds <bos> by default


# ----------------------------------------------------------------------------- weights


def test_default_init_terms_are_randomised(hf_e2b):
    t = read_hf_tensors(hf_e2b)

    norms = [v for k, v in t.items() if k.endswith("norm.weight")]
    assert norms and all(not torch.allclose(v, torch.ones_like(v)) for v in norms)
    scalars = torch.cat([v for k, v in t.items() if k.endswith("layer_scalar")])
    assert scalars.min() >= 0.3 and scalars.max() <= 1.5 and scalars.std() > 0.05
    assert all(v.abs().min() > 0 for k, v in t.items() if k.endswith("per_dim_scale"))
    bounds = {k: v for k, v in t.items() if k.rsplit(".", 1)[-1] in
              ("input_min", "input_max", "output_min", "output_max")}
    assert len(bounds) == 2 * 10 * 4  # 2 audio layers x 10 clipped linears x 4 bounds
    assert all(torch.isfinite(v) for v in bounds.values())


def test_clip_bounds_are_active_for_typical_audio(hf_e2b):
    from transformers import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    model, _ = load_hf(hf_e2b)
    sr = 16000
    t = np.arange(int(1.3 * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(7).standard_normal(t.size)
    feats = Gemma4AudioFeatureExtractor()([wave.astype(np.float32)], sampling_rate=sr, return_tensors="pt")
    clipped = []

    def count(module, inputs, _output):
        x = inputs[0]
        y = module.linear(x.clamp(module.input_min, module.input_max))
        clipped.append(bool(((x < module.input_min) | (x > module.input_max)).any()))
        clipped.append(bool(((y < module.output_min) | (y > module.output_max)).any()))

    for m in model.model.audio_tower.modules():
        if isinstance(m, Gemma4ClippableLinear):
            m.register_forward_hook(count)
    with torch.no_grad():
        model.model.audio_tower(feats["input_features"], feats["input_features_mask"])

    assert len(clipped) == 2 * 10 * 2
    assert sum(clipped) >= len(clipped) // 2


# ----------------------------------------------------------------------------- mlx layout


def expected_quantized_modules(hf_keys, text_config, group_size=64) -> set[str]:
    """Module paths (mlx names) that mlx-vlm's converter would quantize, derived from the spec."""
    first_shared = text_config["num_hidden_layers"] - text_config["num_kv_shared_layers"]
    out = set()
    for key, shape in hf_keys.items():
        if not key.endswith(".weight") or len(shape) != 2 or shape[-1] % group_size:
            continue
        if key.startswith("model.language_model."):
            name = "language_model.model." + key.removeprefix("model.language_model.")
            parts = name.split(".")
            if parts[3:4] == ["layers"] and int(parts[4]) >= first_shared and parts[6] in ("k_proj", "v_proj"):
                continue
            out.add(name.removesuffix(".weight"))
        elif key == "model.embed_audio.embedding_projection.weight":
            out.add("embed_audio.embedding_projection")
    return out


def test_mlx_layout_renames_keys_drops_shared_kv_and_makes_convs_channels_last(hf_e2b, tmp_path):
    path = build_checkpoint(tmp_path / "mlx", "e2b", seed=0, layout="mlx")
    w = mx.load(str(path / "model.safetensors"))
    hf = read_hf_tensors(hf_e2b)

    assert all(k.startswith(("language_model.model.", "audio_tower.", "embed_audio.")) for k in w)
    assert not [k for k in w if "rotary_emb" in k or k.endswith(".scales")]
    for i in range(5, 10):  # e2b: layers 5..9 are KV consumers
        assert f"language_model.model.layers.{i}.self_attn.k_proj.weight" not in w
        assert f"language_model.model.layers.{i}.self_attn.k_norm.weight" not in w
    assert "language_model.model.layers.4.self_attn.v_proj.weight" in w
    assert "audio_tower.layers.0.self_attn.q_proj.input_max" in w
    assert w["audio_tower.layers.0.self_attn.q_proj.input_max"].shape == ()  # scalars, as mlx-vlm loads them

    conv0 = hf["model.audio_tower.subsample_conv_projection.layer0.conv.weight"].numpy()
    conv1 = hf["model.audio_tower.subsample_conv_projection.layer1.conv.weight"].numpy()
    dw = hf["model.audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].numpy()
    assert w["audio_tower.subsample_conv_projection.layer0.conv.weight"].shape == (128, 3, 3, 1)
    np.testing.assert_array_equal(np.array(w["audio_tower.subsample_conv_projection.layer0.conv.weight"]),
                                  conv0.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.array(w["audio_tower.subsample_conv_projection.layer1.conv.weight"]),
                                  conv1.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.array(w["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"]),
                                  dw.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.array(w["language_model.model.layers.3.self_attn.q_proj.weight"]),
                                  hf["model.language_model.layers.3.self_attn.q_proj.weight"].numpy())


def test_mlx_quantized_checkpoint_has_scales_exactly_for_the_quantized_modules(mlx_q4, hf_e2b):
    w = mx.load(str(mlx_q4 / "model.safetensors"))
    cfg = json.loads((mlx_q4 / "config.json").read_text())
    hf = {k: tuple(v.shape) for k, v in read_hf_tensors(hf_e2b).items()}

    quantized = {k.removesuffix(".scales") for k in w if k.endswith(".scales")}
    assert quantized == expected_quantized_modules(hf, cfg["text_config"])
    assert {"language_model.model.embed_tokens", "language_model.model.embed_tokens_per_layer",
            "language_model.model.per_layer_model_projection", "embed_audio.embedding_projection",
            "language_model.model.layers.0.per_layer_input_gate"} <= quantized
    assert "language_model.model.layers.0.per_layer_projection" not in quantized  # input 32, not /64
    assert not [k for k in w if k.startswith("audio_tower.") and w[k].dtype == mx.uint32]
    assert all(f"{m}.biases" in w and w[f"{m}.weight"].dtype == mx.uint32 for m in quantized)

    override = "language_model.model.layers.0.mlp.gate_proj"
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine",
                                   override: {"group_size": 64, "bits": 8}}
    assert cfg["quantization_config"] == cfg["quantization"]
    for module, bits in [(override, 8), ("language_model.model.layers.0.mlp.up_proj", 4)]:
        packed = w[f"{module}.weight"]
        original = hf["model." + module.replace("language_model.model.", "language_model.") + ".weight"]
        assert packed.shape == (original[0], original[1] * bits // 32)
        assert w[f"{module}.scales"].shape == (original[0], original[1] // 64)
    deq = mx.dequantize(w[f"{override}.weight"], w[f"{override}.scales"], w[f"{override}.biases"],
                        group_size=64, bits=8)
    ref = read_hf_tensors(hf_e2b)["model.language_model.layers.0.mlp.gate_proj.weight"].numpy()
    assert np.abs(np.array(deq) - ref).max() < 0.01 * np.abs(ref).max()


def test_sharded_output_has_a_valid_index(tmp_path):
    out = tmp_path / "sharded"
    assert main([str(out), "--preset", "wide", "--layout", "mlx", "--bits", "8",
                 "--dtype", "bfloat16", "--shard-size", "400000"]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    total = 0
    for f in files:
        arrays = mx.load(str(f))
        assert {k for k, v in index["weight_map"].items() if v == f.name} == set(arrays)
        total += sum(a.nbytes for a in arrays.values())
        floats = [a.dtype for a in arrays.values() if a.dtype not in (mx.uint32,)]
        assert set(floats) == {mx.bfloat16}
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_sharded_hf_checkpoint_loads_in_transformers(tmp_path):
    path = build_checkpoint(tmp_path / "hf_sharded", "e2b", shard_size=1_000_000, dtype="bfloat16")

    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    _, info = load_hf(path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_presets_are_small_enough_for_the_test_suite():
    for preset in (PRESETS[name] for name in ("e2b", "e4b", "wide")):
        assert preset["text"]["vocab_size"] == preset["text"]["vocab_size_per_layer_input"] == 512
        assert preset["text"]["hidden_size"] <= 128 and preset["audio"]["hidden_size"] <= 64
