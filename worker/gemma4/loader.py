"""Load a Gemma 4 checkpoint (google HF layout or mlx-community layout) into MLX modules.

Both layouts are mapped to one naming in ``split_weights``; nothing else in the engine
knows about file layouts. The text decoder is mlx-lm's ``gemma4_text.Model``; the audio
tower and projector are ours. Quantized modules (mlx-community) are recognised the way
MLX itself does it: a module is quantized iff ``<path>.scales`` exists, with the
per-module overrides recorded in ``config.json``'s ``quantization`` block.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text
from tokenizers import Tokenizer

from producer.failures import AudioqError, FailureCode
from worker.gemma4.audio_tower import AudioConfig, AudioTower, sanitize_audio
from worker.gemma4.config import CheckpointConfig, load_config
from worker.gemma4.projector import AudioEmbedder

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
SKIPPED_PREFIXES = ("vision_tower.", "embed_vision.", "multi_modal_projector.")
AUDIO_PREFIXES = ("audio_tower.", "embed_audio.")


@dataclass
class LoadedModel:
    """Everything the engine keeps resident."""

    config: CheckpointConfig
    text: gemma4_text.Model
    audio_tower: AudioTower | None
    embed_audio: AudioEmbedder | None
    tokenizer: Tokenizer
    name: str


def resolve_checkpoint(model: str) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (or found in the cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AudioqError(FailureCode.MODEL_ERROR, f"{model} is a file, not a checkpoint directory")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise AudioqError(FailureCode.MODEL_ERROR,
                          f"{model}: no such checkpoint directory (nor a hub repo id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise AudioqError(FailureCode.MODEL_ERROR, f"could not fetch {model} from the hub: {exc}") from exc


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; a sharded index must have all its shards."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise AudioqError(FailureCode.MODEL_ERROR,
                              f"checkpoint {path} is missing weight file(s) {', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AudioqError(FailureCode.MODEL_ERROR, f"checkpoint {path} has no *.safetensors weights")
    return files


def split_weights(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """Map both layouts to (text weights named as mlx-lm's Model, audio weights), drop vision.

    google: ``model.language_model.X``, ``model.audio_tower.X``; mlx-community:
    ``language_model.model.X``, ``audio_tower.X``. Text keys come out as ``model.X``.
    """
    text, audio = {}, {}
    for key, value in weights.items():
        key = key.removeprefix("model.")
        if key.startswith(SKIPPED_PREFIXES):
            continue
        if key.startswith(AUDIO_PREFIXES):
            audio[key] = value
        elif key.startswith("language_model."):
            key = key.removeprefix("language_model.")
            text[key if key.startswith(("model.", "lm_head.")) else "model." + key] = value
        else:
            raise AudioqError(FailureCode.MODEL_ERROR, f"unexpected tensor {key!r} in checkpoint")
    return text, audio


def _quantize(module: nn.Module, prefix: str, weights: dict[str, mx.array],
              quantization: dict[str, Any] | None) -> None:
    """Quantize exactly the sub-modules whose ``.scales`` are in the checkpoint."""
    if not quantization:
        return
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, m: nn.Module):
        full = prefix + path
        override = quantization.get(full)
        if override is False or not hasattr(m, "to_quantized"):
            return False
        if f"{path}.scales" not in weights:
            return False
        return {**defaults, **override} if isinstance(override, dict) else defaults

    nn.quantize(module, class_predicate=predicate)


def _load_into(module: nn.Module, weights: dict[str, mx.array], what: str, path: Path) -> None:
    """Load weights, naming any tensor the checkpoint lacks or has in excess."""
    expected = {k for k, _ in tree_flatten(module.parameters())}
    missing = sorted(expected - weights.keys())
    extra = sorted(weights.keys() - expected)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise AudioqError(FailureCode.MODEL_ERROR, f"checkpoint {path} lacks {what} tensor(s): {shown}")
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise AudioqError(FailureCode.MODEL_ERROR, f"checkpoint {path} has unknown {what} tensor(s): {shown}")
    shapes = dict(tree_flatten(module.parameters()))
    for key, value in weights.items():
        if shapes[key].shape != value.shape:
            raise AudioqError(FailureCode.MODEL_ERROR,
                              f"checkpoint {path}: {what} tensor {key} has shape {value.shape}, "
                              f"config implies {shapes[key].shape}")
    module.load_weights(list(weights.items()), strict=True)


def load_model(model: str) -> LoadedModel:
    """Load config, tokenizer and weights; the audio bundle when the checkpoint has one."""
    path = resolve_checkpoint(model)
    config = load_config(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as exc:
            raise AudioqError(FailureCode.MODEL_ERROR, f"cannot read weights {file}: {exc}") from exc
    text_weights, audio_weights = split_weights(weights)

    text = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config.text))
    text_weights = text.sanitize(text_weights)
    _quantize(text, "language_model.", text_weights, config.quantization)
    _load_into(text, text_weights, "text", path)

    tower = embedder = None
    if config.has_audio:
        if not audio_weights:
            raise AudioqError(FailureCode.MODEL_ERROR,
                              f"checkpoint {path} has an audio_config but no audio_tower weights: a "
                              "text-only conversion (e.g. by mlx-lm)? Use google's checkpoint or an "
                              "mlx-vlm conversion")
        audio_weights = sanitize_audio(audio_weights)
        audio_config = AudioConfig.from_dict(config.audio)
        tower = AudioTower(audio_config)
        tower_weights = {k.removeprefix("audio_tower."): v for k, v in audio_weights.items()
                         if k.startswith("audio_tower.")}
        _load_into(tower, tower_weights, "audio tower", path)
        embedder = AudioEmbedder(audio_config.output_proj_dims, text.args.hidden_size,
                                 eps=audio_config.rms_norm_eps)
        embed_weights = {k.removeprefix("embed_audio."): v for k, v in audio_weights.items()
                         if k.startswith("embed_audio.")}
        _quantize(embedder, "embed_audio.", embed_weights, config.quantization)
        _load_into(embedder, embed_weights, "embed_audio", path)
    mx.eval(text.parameters())
    if tower is not None:
        mx.eval(tower.parameters(), embedder.parameters())
    return LoadedModel(config=config, text=text, audio_tower=tower, embed_audio=embedder,
                       tokenizer=tokenizer, name=model)
