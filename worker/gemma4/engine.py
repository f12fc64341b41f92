"""The resident Gemma 4 audio engine: clips in, text out.

Two calls, one seam for every caller (the queue worker, the local ``transcribe`` command,
the chunks of a long recording):

- ``Engine.stream(feed, on_done)``: clips arrive while others run. Before every decode step
  the engine asks ``feed(free)`` for up to ``free`` new clips and reports each clip's outcome
  to ``on_done`` as soon as it is known, so a finished clip never waits for the others.
- ``Engine.run(clips)``: a fixed list, outputs in order (``stream`` underneath).

A clip may carry its own ``on_stage`` hook, called at every stage boundary of that clip
(and at every decode step while it generates): a hook that raises (a job's deadline or
cancel) drops that clip alone, and its exception is its outcome. A clip without samples
is a text-only turn (a question over a transcript). Today clips run one at a time;
batching replaces the inside of ``stream`` without changing this interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from producer.failures import AudioqError, FailureCode
from worker.gemma4.decoder import Decoder
from worker.gemma4.features import MAX_SAMPLES, SAMPLE_RATE, audio_token_count, log_mel
from worker.gemma4.loader import LoadedModel, load_model
from worker.gemma4.projector import valid_rows
from worker.gemma4.prompt import PromptBuilder

StageHook = Callable[[str], None]


@dataclass(eq=False)
class ClipRequest:
    samples: np.ndarray | None  # mono float32 at 16 kHz in [-1, 1]; None: a text-only turn
    instruction: str
    max_new_tokens: int
    on_stage: StageHook | None = None  # this clip's check point; raising drops the clip
    tag: Any = None  # the caller's, untouched


@dataclass
class ClipOutput:
    text: str
    tokens: list[int]  # generated ids, stop token excluded
    audio_tokens: int  # soft tokens inserted into the prompt
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


Feed = Callable[[int], Iterable[ClipRequest]]
DoneHook = Callable[[ClipRequest, "ClipOutput | BaseException"], None]


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
        """Every clip with its own instruction and token budget; outputs in order.

        The first clip that fails raises its error (after the others ran). ``on_stage`` is
        called at the stage boundaries of every clip, after the clip's own hook.
        """
        pending = [self._with_hook(c, on_stage) for c in clips]
        position = {id(c): i for i, c in enumerate(pending)}
        outcomes: list[ClipOutput | BaseException | None] = [None] * len(clips)

        def feed(free: int) -> list[ClipRequest]:
            taken = pending[:free]
            del pending[:free]
            return taken

        def on_done(clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
            outcomes[position[id(clip)]] = outcome

        self.stream(feed, on_done)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    @staticmethod
    def _with_hook(clip: ClipRequest, extra: StageHook | None) -> ClipRequest:
        if extra is None:
            return clip
        own = clip.on_stage

        def hook(stage: str) -> None:
            if own is not None:
                own(stage)
            extra(stage)

        return ClipRequest(clip.samples, clip.instruction, clip.max_new_tokens, hook, clip.tag)

    def stream(self, feed: Feed, on_done: DoneHook) -> None:
        """Run clips from ``feed`` until it gives none and none is running (see the module's docstring).

        An exception raised by ``feed`` or ``on_done`` ends the stream and goes to the caller.
        """
        while True:
            clips = list(feed(1))
            if not clips:
                return
            for clip in clips:
                try:
                    outcome = self._one(clip)
                except Exception as exc:
                    outcome = exc
                on_done(clip, outcome)

    def _one(self, clip: ClipRequest) -> ClipOutput:
        hook = clip.on_stage or (lambda stage: None)
        timings: dict[str, float] = {}
        count, rows = 0, None
        if clip.samples is not None:
            count = check_clip(clip.samples)
            hook("front_end")
            (rows,), timings = self.encode([clip.samples], hook)
            if rows.shape[0] != count:
                raise AudioqError(FailureCode.MODEL_ERROR,
                                  f"encoder gave {rows.shape[0]} audio rows, expected {count}")
            ids = self.prompts.audio_prompt(clip.instruction, count)
        else:
            ids = self.prompts.text_prompt(clip.instruction)
        hook("prefill")
        started = time.perf_counter()
        tokens: list[int] = []
        first = None
        for token in self.decoder.greedy(ids, rows, clip.max_new_tokens, self.model.config.tokens.stop,
                                         lambda: hook("generate")):
            if first is None:
                first = time.perf_counter()
            tokens.append(token)
        done = time.perf_counter()
        timings["prefill"] = (first or done) - started
        timings["generate"] = done - (first or done)
        return ClipOutput(text=self.prompts.reply_text(tokens), tokens=tokens, audio_tokens=count, timings=timings)
