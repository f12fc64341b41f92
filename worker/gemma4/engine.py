"""The resident Gemma 4 audio engine: clips in, text out.

``Engine.run`` takes a list of clips so that callers (the queue worker, the local
``transcribe`` command) never assume one clip per call: today the front-end and the audio
tower already run the whole list as one padded batch, and decoding goes clip by clip;
batched decoding can replace that loop without changing the interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from producer.failures import AudioqError, FailureCode
from worker.gemma4.decoder import Decoder
from worker.gemma4.features import MAX_SAMPLES, SAMPLE_RATE, audio_token_count, log_mel
from worker.gemma4.loader import LoadedModel, load_model
from worker.gemma4.projector import valid_rows
from worker.gemma4.prompt import PromptBuilder

StageHook = Callable[[str], None]


@dataclass
class ClipRequest:
    samples: np.ndarray  # mono float32 at 16 kHz, in [-1, 1]
    instruction: str
    max_new_tokens: int


@dataclass
class ClipOutput:
    text: str
    tokens: list[int]  # generated ids, stop token excluded
    audio_tokens: int  # soft tokens inserted into the prompt
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def check_clip(samples: np.ndarray) -> int:
    """Validate one clip; returns its audio soft-token count."""
    if samples.ndim != 1:
        raise AudioqError(FailureCode.INVALID_REQUEST, f"expected mono samples, got shape {samples.shape}")
    if samples.size == 0:
        raise AudioqError(FailureCode.EMPTY_AUDIO, "the audio has no samples")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioqError(FailureCode.CORRUPT_AUDIO, f"the audio has {bad} NaN or infinite samples")
    if samples.size > MAX_SAMPLES:
        raise AudioqError(FailureCode.AUDIO_TOO_LONG,
                          f"clip is {samples.size / SAMPLE_RATE:.2f} s; the model takes at most "
                          f"{MAX_SAMPLES / SAMPLE_RATE:.0f} s per clip")
    count = audio_token_count(samples.size)
    if count == 0:
        raise AudioqError(FailureCode.EMPTY_AUDIO,
                          f"clip is {samples.size} samples ({samples.size / SAMPLE_RATE * 1000:.1f} ms): "
                          "too short for one audio token")
    return count


class Engine:
    sample_rate = SAMPLE_RATE
    max_clip_seconds = MAX_SAMPLES / SAMPLE_RATE

    def __init__(self, model: LoadedModel):
        if model.audio_tower is None:
            raise AudioqError(FailureCode.MODEL_ERROR,
                              f"model {model.name} has no audio tower (its config.json has no "
                              "audio_config): use a Gemma 4 E2B or E4B checkpoint")
        self.model = model
        self.model_id = model.name
        self.decoder = Decoder(model.text, model.config.tokens)
        self.prompts = PromptBuilder(model.tokenizer, model.config.tokens)

    @classmethod
    def load(cls, model: str) -> "Engine":
        return cls(load_model(model))

    def encode(self, clips: list[np.ndarray], on_stage: StageHook | None = None
               ) -> tuple[list[mx.array], dict[str, float]]:
        """Audio soft-token rows [n_i, H] per clip: front-end, tower and projector as one batch."""
        started = time.perf_counter()
        features, mask = log_mel([c.astype(np.float32, copy=False) for c in clips])
        mx.eval(features, mask)
        front_end = time.perf_counter()
        if on_stage is not None:
            on_stage("audio_tower")
        out, out_mask = self.model.audio_tower(features.astype(self._audio_dtype()), mask)
        embedded = self.model.embed_audio(out)
        counts = out_mask.sum(axis=1).tolist()
        rows = valid_rows(embedded, out_mask)
        per_clip = mx.split(rows, np.cumsum(counts)[:-1].tolist()) if len(counts) > 1 else [rows]
        mx.eval(per_clip)
        tower = time.perf_counter()
        return per_clip, {"front_end": front_end - started, "audio_tower": tower - front_end}

    def _audio_dtype(self) -> mx.Dtype:
        return self.model.audio_tower.output_proj.weight.dtype

    def run(self, clips: list[ClipRequest], on_stage: StageHook | None = None) -> list[ClipOutput]:
        """Transcribe/understand each clip with its own instruction and token budget."""
        hook = on_stage or (lambda stage: None)
        counts = [check_clip(c.samples) for c in clips]
        hook("front_end")
        rows, shared = self.encode([c.samples for c in clips], hook)
        outputs = []
        for clip, count, clip_rows in zip(clips, counts, rows):
            if clip_rows.shape[0] != count:
                raise AudioqError(FailureCode.MODEL_ERROR,
                                  f"encoder gave {clip_rows.shape[0]} audio rows, expected {count}")
            hook("prefill")
            timings = dict(shared)
            started = time.perf_counter()
            ids = self.prompts.audio_prompt(clip.instruction, count)
            tokens: list[int] = []
            first = None
            for token in self.decoder.greedy(ids, clip_rows, clip.max_new_tokens,
                                             self.model.config.tokens.stop, lambda: hook("generate")):
                if first is None:
                    first = time.perf_counter()
                tokens.append(token)
            done = time.perf_counter()
            timings["prefill"] = (first or done) - started
            timings["generate"] = done - (first or done)
            outputs.append(ClipOutput(text=self.prompts.reply_text(tokens), tokens=tokens,
                                      audio_tokens=count, timings=timings))
        return outputs
