"""What a Gemma 4 checkpoint directory says about itself, read once and validated.

Token ids (audio placeholder, begin/end of audio, pad, stop ids) come from the checkpoint's
config files, never from constants in code: the tiny test checkpoints remap them into a
small vocabulary, and a future revision of the real model may move them too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.failures import AudioqError, FailureCode

REQUIRED_FILES = ("config.json", "tokenizer.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AudioqError(FailureCode.MODEL_ERROR, f"{path} is not valid JSON: {exc}") from exc


@dataclass
class TokenIds:
    """Special token ids the engine needs, as the checkpoint names them."""

    pad: int
    bos: int
    audio: int
    boa: int
    eoa: int
    stop: tuple[int, ...]
    multimodal: tuple[int, ...]  # every media placeholder id (audio, image, video)


@dataclass
class CheckpointConfig:
    path: Path
    text: dict[str, Any]
    audio: dict[str, Any] | None
    tokens: TokenIds
    quantization: dict[str, Any] | None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None


def _stop_ids(path: Path, config: dict[str, Any], text: dict[str, Any]) -> tuple[int, ...]:
    """Stop ids from generation_config.json; the config's eos ids when that file is absent."""
    gen_path = path / "generation_config.json"
    source = read_json(gen_path) if gen_path.exists() else text
    eos = source.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        raise AudioqError(FailureCode.MODEL_ERROR,
                          f"{path}: neither generation_config.json nor config.json names eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def load_config(path: Path) -> CheckpointConfig:
    """Read config.json (+ generation_config.json) of a checkpoint directory."""
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise AudioqError(FailureCode.MODEL_ERROR, f"checkpoint {path} is missing {name}")
    config = read_json(path / "config.json")
    text = dict(config.get("text_config") or {})
    if not text:
        raise AudioqError(FailureCode.MODEL_ERROR,
                          f"{path}/config.json has no text_config: not a Gemma 4 multimodal checkpoint")
    audio = config.get("audio_config")

    def need(key: str, *alternatives: str) -> int:
        for k in (key, *alternatives):
            if config.get(k) is not None:
                return int(config[k])
        raise AudioqError(FailureCode.MODEL_ERROR, f"{path}/config.json does not name {key}")

    multimodal = tuple(int(config[k]) for k in ("audio_token_id", "image_token_id", "video_token_id")
                       if config.get(k) is not None)
    def text_id(key: str) -> int:
        value = text.get(key, config.get(key))
        if value is None:
            raise AudioqError(FailureCode.MODEL_ERROR, f"{path}/config.json does not name {key}")
        return int(value)

    tokens = TokenIds(
        pad=text_id("pad_token_id"),
        bos=text_id("bos_token_id"),
        audio=need("audio_token_id") if audio else -1,
        boa=need("boa_token_id") if audio else -1,
        eoa=need("eoa_token_id", "eoa_token_index") if audio else -1,
        stop=_stop_ids(path, config, text),
        multimodal=multimodal,
    )
    if "vocab_size" not in text and "vocab_size" in config:
        text["vocab_size"] = config["vocab_size"]
    return CheckpointConfig(
        path=path,
        text=text,
        audio=audio,
        tokens=tokens,
        quantization=config.get("quantization") or None,
    )
