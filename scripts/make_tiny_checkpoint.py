"""Build tiny random-weight Gemma 4 (E2B / E4B) checkpoints with the real architecture.

Why this exists: the worker runs google's Gemma 4 E2B/E4B audio+text model, but no real
weights can be downloaded here (and 10 GB would be far too slow for tests anyway). So the
test-suite and the demo run on checkpoints built by this script: the *real* module graph of
transformers' ``Gemma4ForConditionalGeneration`` (PLE, KV sharing with a sliding and a full
producer, two head dims, proportional RoPE, double-wide MLP, clipped linears, ...) shrunk to
a few hundred thousand parameters, saved in the same file layouts as real checkpoints:

* ``layout="hf"``  - google/* layout (``model.language_model.*``, ``model.audio_tower.*``,
  ``model.embed_audio.*``), loadable by ``Gemma4ForConditionalGeneration.from_pretrained``,
  which is the numerical reference for the MLX port;
* ``layout="mlx"`` - mlx-community (mlx-vlm converted) layout: renamed keys, KV-shared
  layers' k/v projections dropped, channels-last convolutions, optional affine quantization
  with ``mx.quantize`` and the ``quantization`` block in ``config.json``.

Default init leaves several terms trivial (norm weights 1, ``layer_scalar`` 1,
``per_dim_scale`` 0, clip bounds +-inf, zero biases), so a port could ignore them and still
match. Every such term is randomised here; the audio clip bounds are calibrated on a
synthetic log-mel input so that some of them really clip for typical audio.

Each checkpoint also gets the json side files (config, generation, processor with the
google ``feature_extractor`` block) and a small SentencePiece-style BPE ``tokenizer.json``
(byte fallback, ``\u2581`` for spaces) whose special tokens sit at the ids the config names.
Output is deterministic for a given (preset, seed).

Usage::

    python scripts/make_tiny_checkpoint.py /tmp/tiny-e2b                      # hf layout
    python scripts/make_tiny_checkpoint.py /tmp/tiny-q4 --layout mlx --bits 4
    python scripts/make_tiny_checkpoint.py /tmp/tiny-e4b --preset e4b --dtype bfloat16
    python scripts/make_tiny_checkpoint.py /tmp/e2b-size --preset e2b-size --dtype bfloat16  # ~10 GB

    # from Python (tests):
    sys.path.insert(0, "scripts")
    from make_tiny_checkpoint import build_checkpoint
    path = build_checkpoint(tmp_path / "ckpt", "e2b", layout="mlx", bits=4)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------
# Token ids and strings (spec §1.2). Low ids are the real ones; the media ids, which are
# above 255 000 in the real vocab, are remapped into the tiny vocab.

VOCAB_SIZE = 512

PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
TURN_OPEN_ID, TURN_CLOSE_ID = 105, 106
NEWLINE_ID = 107
AUDIO_TOKEN_ID, BOA_TOKEN_ID, EOA_TOKEN_ID = 500, 501, 502
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID = 503, 504, 505, 506

SPECIAL_TOKENS: dict[int, str] = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    UNK_ID: "<unk>",
    MASK_ID: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    TURN_OPEN_ID: "<|turn>",
    TURN_CLOSE_ID: "<turn|>",
    AUDIO_TOKEN_ID: "<|audio|>",
    BOA_TOKEN_ID: "<|audio>",
    EOA_TOKEN_ID: "<audio|>",
    IMAGE_TOKEN_ID: "<|image|>",
    VIDEO_TOKEN_ID: "<|video|>",
    BOI_TOKEN_ID: "<|image>",
    EOI_TOKEN_ID: "<image|>",
}

# Top-level config keys naming the media tokens (eoa appears twice in real configs).
MEDIA_TOKEN_CONFIG = {
    "audio_token_id": AUDIO_TOKEN_ID,
    "boa_token_id": BOA_TOKEN_ID,
    "eoa_token_index": EOA_TOKEN_ID,
    "eoa_token_id": EOA_TOKEN_ID,
    "image_token_id": IMAGE_TOKEN_ID,
    "video_token_id": VIDEO_TOKEN_ID,
    "boi_token_id": BOI_TOKEN_ID,
    "eoi_token_id": EOI_TOKEN_ID,
}

# --------------------------------------------------------------------------------------
# Presets. Widths that the real mlx conversions quantize (text linears, embeddings,
# per_layer_model_projection, embed_audio.embedding_projection) are multiples of 64 in
# their input dim, so group_size 64 quantizes them; per_layer_projection's input
# (hidden_size_per_layer_input) is not, so it stays dense, as mlx's quantizer does.

ROPE_PARAMETERS = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}

SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(num_layers: int, period: int) -> list[str]:
    """`period - 1` sliding layers then one full layer, repeated (full at i % period == period - 1)."""
    return [FULL if i % period == period - 1 else SLIDING for i in range(num_layers)]


_TEXT_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "vocab_size_per_layer_input": VOCAB_SIZE,
    "sliding_window": 8,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072,
    "tie_word_embeddings": True,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "rope_parameters": ROPE_PARAMETERS,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_ID,
    "bos_token_id": BOS_ID,
}

_AUDIO_COMMON = {
    "subsampling_conv_channels": [128, 8],  # [0] must equal the 128 mel bins
    "conv_kernel_size": 5,
    "residual_weight": 0.5,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "attention_logit_cap": 50.0,
    "attention_invalid_logits_value": -1.0e9,
    "use_clipped_linears": True,
    "rms_norm_eps": 1e-6,
    "gradient_clipping": 1e10,
    "hidden_act": "silu",
}

PRESETS: dict[str, dict[str, dict]] = {
    # E2B structure: 4 sliding + 1 full, KV shared from a sliding and a full producer,
    # double-wide MLP on the consumers, PLE, head_dim 32 / global 64.
    "e2b": {
        "text": {
            **_TEXT_COMMON,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 10,
            "layer_types": _layer_types(10, 5),
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "global_head_dim": 64,
            "hidden_size_per_layer_input": 32,
            "num_kv_shared_layers": 5,
            "use_double_wide_mlp": True,
        },
        "audio": {
            **_AUDIO_COMMON,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "output_proj_dims": 128,
        },
    },
    # E4B structure: 5 sliding + 1 full, KV sharing, 2 kv heads, no double-wide MLP.
    "e4b": {
        "text": {
            **_TEXT_COMMON,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 12,
            "layer_types": _layer_types(12, 6),
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "global_head_dim": 64,
            "hidden_size_per_layer_input": 16,
            "num_kv_shared_layers": 6,
            "use_double_wide_mlp": False,
        },
        "audio": {
            **_AUDIO_COMMON,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "output_proj_dims": 64,
        },
    },
    # E2B flags with other widths: audio 64 wide / 3 layers, text 128 with 2 heads of 64/128;
    # output_proj_dims == text hidden as in the real E2B.
    "wide": {
        "text": {
            **_TEXT_COMMON,
            "hidden_size": 128,
            "intermediate_size": 192,
            "num_hidden_layers": 10,
            "layer_types": _layer_types(10, 5),
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "global_head_dim": 128,
            "hidden_size_per_layer_input": 32,
            "num_kv_shared_layers": 5,
            "use_double_wide_mlp": True,
        },
        "audio": {
            **_AUDIO_COMMON,
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "subsampling_conv_channels": [128, 16],
            "output_proj_dims": 128,
        },
    },
}

# For benchmarks, not tests: the real E2B/E4B audio tower (1024 wide, 12 layers, 8 heads,
# output 1536, ~300 M parameters) in front of the tiny e2b text decoder.
PRESETS["e2b-audio"] = copy.deepcopy(PRESETS["e2b"])
PRESETS["e2b-audio"]["audio"].update(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,
                                     subsampling_conv_channels=[128, 32], output_proj_dims=1536)


# For GPU benchmarks: the real E2B dimensions (spec §1.1), random weights. Far too large
# for transformers' init (5 B parameters): ``build_full_size`` writes it tensor by tensor.
PRESETS["e2b-size"] = {
    "text": {
        **_TEXT_COMMON,
        "vocab_size": 262_144,
        "vocab_size_per_layer_input": 262_144,
        "sliding_window": 512,
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "num_hidden_layers": 35,
        "layer_types": _layer_types(35, 5),
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "global_head_dim": 512,
        "hidden_size_per_layer_input": 256,
        "num_kv_shared_layers": 20,
        "use_double_wide_mlp": True,
    },
    "audio": copy.deepcopy(PRESETS["e2b-audio"]["audio"]),
}
FULL_SIZE_PRESETS = {"e2b-size"}


# --------------------------------------------------------------------------------------
# Json side files (spec §1.1).

GENERATION_CONFIG = {
    "bos_token_id": BOS_ID,
    "pad_token_id": PAD_ID,
    "eos_token_id": [EOS_ID, TURN_CLOSE_ID, 50],
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 64,
    "top_p": 0.95,
}

FEATURE_EXTRACTOR = {
    "feature_extractor_type": "Gemma4AudioFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16_000,
    "frame_length": 320,
    "hop_length": 160,
    "fft_length": 512,
    "fft_overdrive": False,
    "min_frequency": 0.0,
    "max_frequency": 8000.0,
    "preemphasis": 0.0,
    "preemphasis_htk_flavor": True,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "mel_floor": 0.001,
    "per_bin_mean": None,
    "per_bin_stddev": None,
    "padding_value": 0.0,
    "padding_side": "right",
    "return_attention_mask": True,
}

PROCESSOR_CONFIG = {
    "processor_class": "Gemma4Processor",
    "audio_seq_length": 750,
    "audio_ms_per_token": 40,
    "feature_extractor": FEATURE_EXTRACTOR,
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": SPECIAL_TOKENS[BOS_ID],
    "eos_token": SPECIAL_TOKENS[EOS_ID],
    "pad_token": SPECIAL_TOKENS[PAD_ID],
    "unk_token": SPECIAL_TOKENS[UNK_ID],
    "mask_token": SPECIAL_TOKENS[MASK_ID],
    "audio_token": SPECIAL_TOKENS[AUDIO_TOKEN_ID],
    "boa_token": SPECIAL_TOKENS[BOA_TOKEN_ID],
    "eoa_token": SPECIAL_TOKENS[EOA_TOKEN_ID],
    "image_token": SPECIAL_TOKENS[IMAGE_TOKEN_ID],
    "boi_token": SPECIAL_TOKENS[BOI_TOKEN_ID],
    "eoi_token": SPECIAL_TOKENS[EOI_TOKEN_ID],
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 131_072,
}

# mlx quantization: this module gets 8 bits when the rest gets 4, to exercise the
# per-module override path of the loaders.
QUANT_OVERRIDE_MODULE = "language_model.model.layers.0.mlp.gate_proj"
QUANT_OVERRIDE_BITS = 8

# --------------------------------------------------------------------------------------
# Tokenizer: a SentencePiece-style BPE (spaces as U+2581, byte fallback) learned on a
# small English text, so ordinary text tokenises into more than single characters and
# any text decodes back exactly.

SPACE = "\u2581"

TOKENIZER_TEXT = """\
The worker takes a job from the queue, downloads the audio file from storage and turns it
into text. Each clip is resampled to sixteen thousand samples per second, cut into frames,
and passed through the audio tower before the language model writes the answer.
Please transcribe this recording. Summarise what the speaker says in one sentence.
What language is spoken in the audio? Describe the sounds you can hear, and say who is
talking if you can tell. The quick brown fox jumps over the lazy dog. She sells sea shells
by the sea shore. There are three hundred and sixty five days in a year, seven days in a
week and twenty four hours in a day. It was a bright cold day in April, and the clocks were
striking thirteen. Thank you for calling; your call is important to us. Numbers: 0 1 2 3 4
5 6 7 8 9 10 100 2024. Questions? Answers! Colons: semicolons; quotes "like this" and
'this', brackets (round) [square] {curly}, a dash - and a slash / and a percent 50%.
The model should stop at the end of its turn and never repeat the prompt.
"""


def _pretokenize(text: str) -> list[str]:
    """Mirror of the tokenizer's normalizer + pre-tokenizer: spaces to U+2581, split before each."""
    return [w for w in re.split(f"(?={SPACE})", text.replace(" ", SPACE)) if w]


def learn_bpe_merges(text: str, num_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE merges on `text`; returns (alphabet, merges in rank order).

    Ties on pair frequency go to the lexicographically smallest pair, so the result is
    fully deterministic.
    """
    words = Counter(_pretokenize(text))
    alphabet = sorted({ch for w in words for ch in w})
    pieces = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, freq in words.items():
            seq = pieces[w]
            for pair in zip(seq, seq[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out
    return alphabet, merges


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A `tokenizers.Tokenizer` with exactly `vocab_size` ids, special tokens at SPECIAL_TOKENS ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    fixed = dict(SPECIAL_TOKENS)
    fixed[NEWLINE_ID] = "\n"
    free_ids = (i for i in range(vocab_size) if i not in fixed)
    vocab = {tok: i for i, tok in fixed.items()}

    def add(token: str) -> bool:
        if token in vocab:
            return True
        try:
            vocab[token] = next(free_ids)
        except StopIteration:
            return False
        return True

    for b in range(256):
        add(f"<0x{b:02X}>")
    n_left = vocab_size - len(vocab)
    alphabet, merges = learn_bpe_merges(TOKENIZER_TEXT, n_left)
    for ch in alphabet:
        add(ch)
    kept_merges = []
    for a, b in merges:
        if a + b not in vocab and not add(a + b):
            break
        kept_merges.append((a, b))
    n_unused = 0
    while add(f"<unused{n_unused}>"):
        n_unused += 1

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=kept_merges, unk_token=SPECIAL_TOKENS[UNK_ID],
                   byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, BOS_ID)]
    )
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for _, s in sorted(SPECIAL_TOKENS.items())]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


# --------------------------------------------------------------------------------------
# Model: build with transformers, randomise the trivial terms, calibrate the clip bounds.


def build_config(preset: str = "e2b", *, with_audio: bool = True):
    """The transformers `Gemma4Config` of a preset (eager attention, no vision tower)."""
    from transformers import Gemma4Config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    config = Gemma4Config(
        text_config=spec["text"],
        audio_config=spec["audio"] if with_audio else None,
        vision_config=None,
        tie_word_embeddings=True,
        **MEDIA_TOKEN_CONFIG,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    if with_audio:
        config.audio_config._attn_implementation = "eager"
    return config


def calibration_features(seed: int, seconds: float = 2.0):
    """Log-mel features of a deterministic synthetic sound (tones + noise), via HF's extractor."""
    from transformers import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(seed + 1)
    sr = FEATURE_EXTRACTOR["sampling_rate"]
    t = np.arange(int(seconds * sr)) / sr
    freqs = rng.uniform(150.0, 3000.0, size=3)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.0, 4.0) * t)
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs)
    wave = 0.1 * envelope * wave + 0.03 * rng.standard_normal(t.size)
    fe = Gemma4AudioFeatureExtractor()
    out = fe([wave.astype(np.float32)], sampling_rate=sr, return_tensors="pt")
    return out["input_features"], out["input_features_mask"]


LOGIT_STD = 1.5


def _randomise_trivial_terms(model, gen) -> None:
    """Give every term that default init leaves trivial a random non-trivial value.

    The token embedding also gets a wider spread than the default init (std 0.02), so the
    tied head gives logits of std ~1.5 and greedy decoding has clear margins; the audio
    projector gets the same scale so audio soft tokens weigh as much as text tokens.
    """
    import torch
    from transformers.models.gemma4 import modeling_gemma4 as g4

    def randn(shape):
        return torch.randn(shape, generator=gen)

    embed = model.model.language_model.embed_tokens.weight
    embed.copy_(randn(embed.shape) * (LOGIT_STD / embed.shape[1] ** 0.5))
    if model.model.embed_audio is not None:  # audio soft tokens on the scale of text embeddings
        proj = model.model.embed_audio.embedding_projection.weight
        proj.copy_(randn(proj.shape) * (LOGIT_STD / proj.shape[1] ** 0.5))

    for module in model.modules():
        if isinstance(module, g4.Gemma4RMSNorm) and module.with_scale:
            module.weight.copy_(1.0 + 0.2 * randn(module.weight.shape))
        elif isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            module.weight.copy_(1.0 + 0.2 * randn(module.weight.shape))
        elif isinstance(module, g4.Gemma4TextDecoderLayer):
            module.layer_scalar.copy_(0.3 + 1.2 * torch.rand(module.layer_scalar.shape, generator=gen))
        elif isinstance(module, g4.Gemma4AudioAttention):
            module.per_dim_scale.copy_(0.5 * randn(module.per_dim_scale.shape))
        elif isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.copy_(0.05 * randn(module.bias.shape))


def _calibrate_clip_bounds(model, gen, seed: int) -> None:
    """Set every audio ClippableLinear's bounds to quantiles of its activations on a typical input.

    Each bound cuts off a random 1-6 % tail of the calibration activations, so the bounds
    are finite, layer-specific and active for ordinary audio.
    """
    import torch
    from transformers.models.gemma4 import modeling_gemma4 as g4

    clipped = [m for m in model.model.audio_tower.modules()
               if isinstance(m, g4.Gemma4ClippableLinear) and m.use_clipped_linears]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx):
        def record(_module, inputs, output):
            seen[idx] = (inputs[0].detach().flatten(), output.detach().flatten())
        return record

    handles = [m.linear.register_forward_hook(hook(i)) for i, m in enumerate(clipped)]
    features, mask = calibration_features(seed)
    try:
        model.model.audio_tower(features, mask)
    finally:
        for h in handles:
            h.remove()

    for i, m in enumerate(clipped):
        x, y = seen[i]
        tails = (0.01 + 0.05 * torch.rand(4, generator=gen)).tolist()
        m.input_min.fill_(torch.quantile(x, tails[0]).item())
        m.input_max.fill_(torch.quantile(x, 1.0 - tails[1]).item())
        m.output_min.fill_(torch.quantile(y, tails[2]).item())
        m.output_max.fill_(torch.quantile(y, 1.0 - tails[3]).item())


def build_model(preset: str = "e2b", *, seed: int = 0, with_audio: bool = True):
    """A float32 `Gemma4ForConditionalGeneration` with random, non-trivial weights."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    config = build_config(preset, with_audio=with_audio)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(config).eval()
        gen = torch.Generator().manual_seed(seed + 12345)
        _randomise_trivial_terms(model, gen)
        if with_audio:
            _calibrate_clip_bounds(model, gen, seed)
    return model


def hf_state_dict(model) -> dict:
    """The tensors a google checkpoint stores: persistent state, without the tied lm_head."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def config_json(model, preset: str, dtype: str) -> dict:
    """config.json as save_pretrained writes it, with the text_config head-dim keys as google ships them.

    transformers turns `global_head_dim` into a `per_layer_config` override on load and
    writes that back out; real checkpoints carry `global_head_dim` /
    `num_global_key_value_heads` instead, so those are restored here.
    """
    model.config.architectures = [type(model).__name__]
    cfg = json.loads(model.config.to_json_string(use_diff=True))
    cfg["dtype"] = dtype
    text = cfg["text_config"]
    text.pop("per_layer_config", None)
    text["global_head_dim"] = PRESETS[preset]["text"]["global_head_dim"]
    text["num_global_key_value_heads"] = None
    text["dtype"] = dtype
    if cfg.get("audio_config"):
        cfg["audio_config"]["dtype"] = dtype
    return cfg


# --------------------------------------------------------------------------------------
# mlx layout (spec §1.4).


def mlx_key(hf_key: str) -> str:
    """google key -> mlx-vlm key: strip `model.`, then `language_model.X` -> `language_model.model.X`."""
    key = hf_key.removeprefix("model.")
    if key.startswith("language_model."):
        key = "language_model.model." + key.removeprefix("language_model.")
    return key


def kv_shared_layers(text_config) -> range:
    first = text_config.num_hidden_layers - text_config.num_kv_shared_layers
    return range(first, text_config.num_hidden_layers)


def to_mlx_arrays(state: dict, text_config) -> dict[str, np.ndarray]:
    """Rename, drop unused KV-shared tensors and rotary buffers, and make convs channels-last."""
    shared = {f"language_model.model.layers.{i}.self_attn.{name}."
              for i in kv_shared_layers(text_config) for name in ("k_proj", "v_proj", "k_norm")}
    out: dict[str, np.ndarray] = {}
    for hf_key, tensor in state.items():
        key = mlx_key(hf_key)
        if "rotary_emb" in key or any(key.startswith(p) for p in shared):
            continue
        arr = tensor.float().numpy()
        if key.startswith("audio_tower.subsample_conv_projection.") and key.endswith("conv.weight"):
            arr = arr.transpose(0, 2, 3, 1)  # [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin]
        elif key.endswith("depthwise_conv1d.weight"):
            arr = arr.transpose(0, 2, 1)  # [C, 1, K] -> [C, K, 1]
        out[key] = np.ascontiguousarray(arr).reshape(arr.shape)  # keep 0-d clip bounds 0-d
    return out


def is_quantizable(key: str, shape: tuple, group_size: int) -> bool:
    """What mlx-vlm's converter quantizes: 2-D weights outside the audio tower, divisible inputs."""
    return (
        key.endswith(".weight")
        and len(shape) == 2
        and not key.startswith("audio_tower.")
        and (key.startswith("language_model.") or key.startswith("embed_audio."))
        and shape[-1] % group_size == 0
    )


def quantize_mlx(arrays: dict, *, bits: int, group_size: int, mode: str) -> tuple[dict, dict]:
    """Quantize the eligible weights with `mx.quantize`; returns (arrays, config quantization dict).

    The dict has the global `group_size`/`bits`/`mode` and, like mlx-lm's
    `quantize_model`, one extra key per module whose parameters differ.
    """
    import mlx.core as mx

    quantization: dict = {"group_size": group_size, "bits": bits, "mode": mode}
    out = {}
    for key, w in arrays.items():
        if not is_quantizable(key, tuple(w.shape), group_size):
            out[key] = w
            continue
        module = key.removesuffix(".weight")
        module_bits = bits
        if module == QUANT_OVERRIDE_MODULE and bits == 4 and mode == "affine":
            module_bits = QUANT_OVERRIDE_BITS
            quantization[module] = {"group_size": group_size, "bits": module_bits}
        packed = mx.quantize(w, group_size=group_size, bits=module_bits, mode=mode)
        out[f"{module}.weight"] = packed[0]
        out[f"{module}.scales"] = packed[1]
        if len(packed) > 2 and packed[2] is not None:
            out[f"{module}.biases"] = packed[2]
    return out, quantization


# --------------------------------------------------------------------------------------
# Writing.


def _nbytes(t) -> int:
    return int(t.nbytes) if hasattr(t, "nbytes") else t.numel() * t.element_size()


def _shards(tensors: dict, shard_size: int | None) -> list[dict]:
    """Split into consecutive groups of at most `shard_size` bytes (one group if None)."""
    if shard_size is None:
        return [tensors]
    groups, current, size = [], {}, 0
    for key, t in tensors.items():
        n = _nbytes(t)
        if current and size + n > shard_size:
            groups.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    groups.append(current)
    return groups


def _write_weights(out: Path, tensors: dict, shard_size: int | None, save) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + index; returns file names."""
    groups = _shards(tensors, shard_size)
    if len(groups) == 1 and shard_size is None:
        save(groups[0], out / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for k, group in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save(group, out / name)
        names.append(name)
        weight_map.update({key: name for key in group})
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / "model.safetensors.index.json", index)
    return names + ["model.safetensors.index.json"]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _random_tensor(key: str, shape: tuple, rng_key, dtype):
    """A random value for one tensor, on the scale its role needs (names as in transformers)."""
    import mlx.core as mx

    name = key.rsplit(".", 1)[-1]
    if name in ("input_min", "output_min"):
        return mx.full(shape, -4.0, dtype)
    if name in ("input_max", "output_max"):
        return mx.full(shape, 4.0, dtype)
    if name == "layer_scalar":
        return mx.random.uniform(0.5, 1.0, shape, dtype, key=rng_key)
    noise = mx.random.normal(shape, dtype, key=rng_key)
    if "norm" in key and name == "weight":
        return 1.0 + 0.1 * noise
    if name in ("bias", "per_dim_scale"):
        return 0.05 * noise
    if key.endswith("embed_tokens.weight"):
        return noise * (LOGIT_STD / shape[1] ** 0.5)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return noise * (1.0 / fan_in ** 0.5)


def build_full_size(out_dir, preset: str = "e2b-size", *, seed: int = 0, dtype: str = "bfloat16",
                    shard_size: int = 4 << 30) -> Path:
    """A random checkpoint of a full-size preset, google layout, without building the model.

    transformers builds the module graph on the meta device (names and shapes, no memory);
    each tensor is then drawn by MLX straight in ``dtype`` and written shard by shard, so
    the build needs about one shard of memory beyond MLX's own. The tokenizer is the tiny
    one with ``<unusedN>`` tokens padding it to the preset's vocabulary (its special ids stay
    where the tiny checkpoints have them; config.json names them).
    """
    import mlx.core as mx
    import torch
    from transformers import Gemma4ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(build_config(preset))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    mx_dtype = mx.bfloat16 if dtype == "bfloat16" else mx.float32
    item = 2 if dtype == "bfloat16" else 4
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * item
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    order = list(shapes)
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _random_tensor(n, shapes[n], keys[order.index(n)], mx_dtype) for n in group}
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
        del tensors
    total = sum(int(np.prod(s)) * item for s in shapes.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_side_files(out, config_json(model, preset, dtype), PRESETS[preset]["text"]["vocab_size"])
    return out


def _write_side_files(out: Path, config: dict, vocab_size: int = VOCAB_SIZE) -> None:
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {**GENERATION_CONFIG, "transformers_version": "5.23.0"})
    _write_json(out / "processor_config.json", PROCESSOR_CONFIG)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    build_tokenizer(vocab_size).save(str(out / "tokenizer.json"))


def build_checkpoint(
    out_dir,
    preset: str = "e2b",
    *,
    seed: int = 0,
    layout: str = "hf",
    bits: int | None = None,
    group_size: int = 64,
    mode: str = "affine",
    dtype: str = "float32",
    with_audio: bool = True,
    shard_size: int | None = None,
) -> Path:
    """Write a tiny random Gemma 4 checkpoint to `out_dir` and return its path.

    layout "hf" = google file layout; "mlx" = mlx-community layout, quantized with
    `mx.quantize` when `bits` is given. `dtype` ("float32" | "bfloat16") is the dtype of
    the float tensors. `shard_size` (bytes) splits the weights into
    model-0000k-of-0000n.safetensors files plus model.safetensors.index.json.
    """
    if layout not in ("hf", "mlx"):
        raise ValueError(f"layout must be 'hf' or 'mlx', not {layout!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if bits is not None and layout != "mlx":
        raise ValueError("quantization (bits) is only available with layout='mlx'")
    if preset in FULL_SIZE_PRESETS:
        raise ValueError(f"{preset} is too large for transformers' init: use build_full_size")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, seed=seed, with_audio=with_audio)
    config = config_json(model, preset, dtype)
    state = hf_state_dict(model)

    if layout == "hf":
        import torch
        from safetensors.torch import save_file

        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        tensors = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        _write_weights(out, tensors, shard_size,
                       lambda group, path: save_file(group, str(path), metadata={"format": "pt"}))
    else:
        import mlx.core as mx

        mx_dtype = mx.bfloat16 if dtype == "bfloat16" else mx.float32
        tensors = {k: mx.array(v).astype(mx_dtype) for k, v in
                   to_mlx_arrays(state, model.config.text_config).items()}
        if bits is not None:
            tensors, quantization = quantize_mlx(tensors, bits=bits, group_size=group_size, mode=mode)
            config["quantization"] = quantization
            config["quantization_config"] = copy.deepcopy(quantization)
        _write_weights(out, tensors, shard_size,
                       lambda group, path: mx.save_safetensors(str(path), group, metadata={"format": "mlx"}))

    _write_side_files(out, config)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="e2b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["hf", "mlx"], default="hf")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=None)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--mode", default="affine")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default float32; bfloat16 for the full-size presets")
    parser.add_argument("--no-audio", action="store_true", help="text-only config, no audio weights")
    parser.add_argument("--shard-size", type=int, default=None, metavar="BYTES")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.preset in FULL_SIZE_PRESETS else "float32")
    if args.preset in FULL_SIZE_PRESETS:
        if args.layout != "hf" or args.bits or args.no_audio:
            parser.error(f"{args.preset} is written in the hf layout only, with audio, unquantized")
        path = build_full_size(args.out_dir, args.preset, seed=args.seed, dtype=args.dtype,
                               **({"shard_size": args.shard_size} if args.shard_size else {}))
        print(f"wrote {args.preset} checkpoint to {path}")
        return 0
    path = build_checkpoint(
        args.out_dir, args.preset, seed=args.seed, layout=args.layout, bits=args.bits,
        group_size=args.group_size, mode=args.mode, dtype=args.dtype,
        with_audio=not args.no_audio, shard_size=args.shard_size,
    )
    print(f"wrote {args.preset} ({args.layout}) checkpoint to {path}")
    for f in sorted(path.iterdir()):
        print(f"  {f.name:40s} {f.stat().st_size:>10d} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
