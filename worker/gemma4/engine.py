"""The resident Gemma 4 audio engine: clips in, text out.

Two calls, one seam for every caller (the queue worker, the local ``transcribe`` command,
the chunks of a long recording):

- ``Engine.stream(feed, on_done)``: clips arrive while others run. Before every decode step
  the engine asks ``feed(free)`` for up to ``free`` new clips (``free`` is 0 while the batch
  is full: the caller may prepare more meanwhile) and reports each clip's outcome to
  ``on_done`` as soon as it is known, so a finished clip never waits for the others.
- ``Engine.run(clips)``: a fixed list, outputs in order (``stream`` underneath).

A clip may carry its own ``on_stage`` hook, called at every stage boundary of that clip
(and at every decode step while it generates): a hook that raises (a job's deadline or
cancel) drops that clip alone, and its exception is its outcome. A clip without samples
is a text-only turn (a question over a transcript).

Inside, clips are batched: new clips are encoded in padded batches (front-end, tower,
projector), prefilled together and join the running decode batch (``scheduler.py``);
clips that arrive while others run are gathered first (``arrivals.py``).
``generate`` is the same machinery for prompts that are already token ids and soft tokens:
the seam tests and benchmarks use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np

from producer.failures import AudioqError, FailureCode
from worker.gemma4.arrivals import Arrivals
from worker.gemma4.decoder import Decoder
from worker.gemma4.features import (MAX_SAMPLES, SAMPLE_RATE, audio_token_count, batch_features, clip_features,
                                    frame_count)
from worker.gemma4.loader import LoadedModel, load_model
from worker.gemma4.projector import valid_rows
from worker.gemma4.prompt import PromptBuilder
from worker.gemma4.scheduler import Row, Scheduler, check_limits, is_out_of_memory, pack
from worker.gemma4.shapes import tower_length

StageHook = Callable[[str], None]
WARM_UP_SECONDS = (1.0, 2.5, 30.0, 7.0, 0.5)  # alone, then joining a running batch two at a time
# Tower and prefill call sizes where the options leave them unset (docs/design.md, "Batching"): on the
# CPU every padded frame costs its full compute and batching buys little else; with CUDA a call's fixed
# cost outweighs padding (H100, 512 jobs: ~2 s less in tower and prefill calls of a ~16 s drain,
# docs/benchmarks.md). Metal's are unmeasured: a Mac's GPU has a small fraction of an H100's compute, so
# it keeps the modest padding the CUDA measurements first chose.
CALL_SIZES = {"cpu": {"encode_rows": 8, "prefill_tokens": 8_192, "padding_slack": 1.0},
              "cuda": {"encode_rows": 64, "prefill_tokens": 32_768, "padding_slack": 4.0},
              "metal": {"encode_rows": 8, "prefill_tokens": 8_192, "padding_slack": 1.25}}


def backend() -> str:
    """Which ``CALL_SIZES`` apply: the default device's backend."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


@dataclass(eq=False)
class ClipRequest:
    samples: np.ndarray | None  # mono float32 at 16 kHz in [-1, 1]; None: a text-only turn
    instruction: str
    max_new_tokens: int
    on_stage: StageHook | None = None  # this clip's check point; raising drops the clip
    tag: Any = None  # the caller's, untouched
    frames: Future | None = None  # its front-end, begun early by ``Engine.start_front_end``


@dataclass
class ClipOutput:
    text: str
    tokens: list[int]  # generated ids, stop token excluded
    audio_tokens: int  # soft tokens inserted into the prompt
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class Prompt:
    """A prompt as the decoder takes it: token ids and the soft tokens of its placeholders."""

    ids: list[int]
    audio: mx.array | None = None  # [n, H]


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
    """The resident model. Options bound the batch (docs/design.md, "Batching"):

    - ``max_rows``: rows decoded together;
    - ``max_batch_tokens``: rows x the longest row's prompt + budget (the KV cache's size);
    - ``prefill_tokens``: padded prompt tokens prefilled in one call;
    - ``encode_rows``: clips through the front-end and tower in one padded batch;
    - ``tower_buckets``: pad tower batches to ``shapes.tower_length`` (default: on MLX's CUDA
      backend, whose convolution plans are per shape; elsewhere padding only costs compute);
    - ``padding_slack``: a tower or prefill batch computes at most this many times what its
      clips need (these three default to the backend's ``CALL_SIZES``);
    - ``join_rows`` / ``join_wait``: while rows run, new clips go in (tower, prefill) in groups
      of this many, or once the first has waited this long (``arrivals.py``; 1: each at once).
    """

    max_clip_seconds = MAX_SAMPLES / SAMPLE_RATE

    def __init__(self, model: LoadedModel, *, max_rows: int = 32, max_batch_tokens: int = 32_768,
                 prefill_tokens: int | None = None, encode_rows: int | None = None,
                 tower_buckets: bool | None = None, padding_slack: float | None = None, join_rows: int = 1,
                 join_wait: float = 0.0):
        if model.audio_tower is None:
            raise AudioqError(FailureCode.MODEL_ERROR,
                              f"model {model.name} has no audio tower (its config.json has no "
                              "audio_config): use a Gemma 4 E2B or E4B checkpoint")
        sizes = CALL_SIZES[backend()]
        prefill_tokens = sizes["prefill_tokens"] if prefill_tokens is None else prefill_tokens
        encode_rows = sizes["encode_rows"] if encode_rows is None else encode_rows
        padding_slack = sizes["padding_slack"] if padding_slack is None else padding_slack
        check_limits(max_rows=max_rows, max_batch_tokens=max_batch_tokens, prefill_tokens=prefill_tokens,
                     encode_rows=encode_rows)
        self.model = model
        self.model_id = model.name
        self.decoder = Decoder(model.text, model.config.tokens)
        self.prompts = PromptBuilder(model.tokenizer, model.config.tokens)
        self.limits = dict(max_rows=max_rows, max_batch_tokens=max_batch_tokens, prefill_tokens=prefill_tokens)
        self.join = dict(join_rows=join_rows, join_wait=join_wait)
        Arrivals(**self.join)  # refuses a bad policy now rather than in the first stream
        self.encode_rows = encode_rows
        self.tower_buckets = mx.cuda.is_available() if tower_buckets is None else tower_buckets
        if not padding_slack >= 1.0:
            raise ValueError(f"padding_slack must be at least 1.0, not {padding_slack}")
        self.padding_slack = padding_slack
        # the front-end of a tower batch, clip by clip: NumPy releases the lock, so it spreads over cores
        self.front_end = ThreadPoolExecutor(max_workers=min(encode_rows, os.cpu_count() or 1),
                                            thread_name_prefix="audioq-front-end")

    @classmethod
    def load(cls, model: str, **options: int | bool | None) -> "Engine":
        return cls(load_model(model), **options)

    # -- encoding -----------------------------------------------------------------------

    def encode(self, clips: list[np.ndarray], on_stage: StageHook | None = None
               ) -> tuple[list[mx.array], dict[str, float]]:
        """Audio soft-token rows [n_i, H] per clip: front-end, tower and projector as one batch."""
        started = time.perf_counter()
        features, mask = self._features(clips, [None] * len(clips))
        front_end = time.perf_counter()
        if on_stage is not None:
            on_stage("audio_tower")
        per_clip = self._tower(features, mask)
        return per_clip, {"front_end": front_end - started, "audio_tower": time.perf_counter() - front_end}

    def start_front_end(self, clip: ClipRequest) -> None:
        """Compute the clip's log-mel frames in the background from now on (a worker calls it when it
        queues the clip), so that the loop, which the decoder needs, only pads them into a batch."""
        if clip.samples is not None and clip.frames is None:
            clip.frames = self.front_end.submit(clip_features, clip.samples)

    def _features(self, clips: list[np.ndarray], begun: list[Future | None]) -> tuple[mx.array, mx.array]:
        """Log-mel features and mask of a tower batch: each clip's frames in a thread, then padded together."""
        frames = [f or self.front_end.submit(clip_features, c) for c, f in zip(clips, begun)]
        per_clip = [f.result() for f in frames]
        longest = max(c.size for c in clips)
        features, mask = batch_features(per_clip, frame_count(longest, self._tower_length(longest)))
        mx.eval(features, mask)
        return features, mask

    def _tower_length(self, samples: int) -> int:
        return tower_length(samples) if self.tower_buckets else samples

    def _tower(self, features: mx.array, mask: mx.array) -> list[mx.array]:
        out, out_mask = self.model.audio_tower(features.astype(self._audio_dtype()), mask)
        embedded = self.model.embed_audio(out)
        counts = out_mask.sum(axis=1).tolist()
        rows = valid_rows(embedded, out_mask)
        per_clip = mx.split(rows, np.cumsum(counts)[:-1].tolist()) if len(counts) > 1 else [rows]
        mx.eval(per_clip)
        return per_clip

    def _tower_split(self, features: mx.array, mask: mx.array, stats: dict[str, float]
                     ) -> list[mx.array | BaseException]:
        """Each clip's soft-token rows, or the reason it has none. A batch that runs out of memory is
        split in halves and retried, as a prefill group is, so only a clip that does not fit alone
        fails for memory (the batch's clips would otherwise all fail at once, and a worker retries
        a clip only while other rows share the engine with it)."""
        stats["towers"] += 1
        try:
            return self._tower(features, mask)
        except Exception as exc:
            clips = features.shape[0]
            if clips == 1 or not is_out_of_memory(exc):
                return [exc] * clips
            mx.clear_cache()
            stats["out_of_memory"] += 1
            half = clips // 2
            return (self._tower_split(features[:half], mask[:half], stats)
                    + self._tower_split(features[half:], mask[half:], stats))

    def _audio_dtype(self) -> mx.Dtype:
        return self.model.audio_tower.output_proj.weight.dtype

    def prompt(self, clip: ClipRequest) -> Prompt:
        """The decoder's prompt for one clip (encoded alone)."""
        if clip.samples is None:
            return Prompt(self.prompts.text_prompt(clip.instruction))
        count = check_clip(clip.samples)
        (rows,), _ = self.encode([clip.samples])
        return Prompt(self.prompts.audio_prompt(clip.instruction, count), rows)

    def _rows(self, clips: list[ClipRequest], stop: frozenset[int], on_done: DoneHook,
              stats: dict[str, float]) -> list[Row]:
        """Clips → decoder rows, audio encoded in padded batches; a clip that fails goes to ``on_done``."""
        rows, audio = [], []
        for clip in clips:
            try:
                if clip.samples is None:
                    rows.append(Row(self.prompts.text_prompt(clip.instruction), None, clip.max_new_tokens,
                                    stop, clip.on_stage, clip))
                    continue
                count = check_clip(clip.samples)
                if clip.on_stage is not None:
                    clip.on_stage("front_end")
                audio.append((clip, count))
            except Exception as exc:
                on_done(clip, exc)
        sizes = [self._tower_length(clip.samples.size) for clip, _ in audio]
        for group in pack(sizes, max_padded=self.encode_rows * MAX_SAMPLES, max_count=self.encode_rows,
                          slack=self.padding_slack):
            rows += self._encoded([audio[i] for i in group], stop, on_done, stats)
        return rows

    def _encoded(self, group: list[tuple[ClipRequest, int]], stop: frozenset[int], on_done: DoneHook,
                 stats: dict[str, float]) -> list[Row]:
        started = time.perf_counter()
        try:
            features, mask = self._features([c.samples for c, _ in group], [c.frames for c, _ in group])
        except Exception as exc:  # the group's front-end failed: its clips fail, the stream goes on
            for clip, _ in group:
                on_done(clip, exc)
            return []
        front_end = time.perf_counter() - started
        live = []
        for i, (clip, count) in enumerate(group):
            try:
                if clip.on_stage is not None:
                    clip.on_stage("audio_tower")
                live.append(i)
            except Exception as exc:
                on_done(clip, exc)
        if not live:
            return []
        if len(live) < len(group):
            index = mx.array(live)
            features, mask = features[index], mask[index]
        started = time.perf_counter()
        encoded = self._tower_split(features, mask, stats)
        tower = time.perf_counter() - started
        stats["front_end"] += front_end
        stats["audio_tower"] += tower
        rows = []
        for i, audio in zip(live, encoded):
            clip, count = group[i]
            if isinstance(audio, BaseException):
                on_done(clip, audio)
                continue
            if audio.shape[0] != count:
                on_done(clip, AudioqError(FailureCode.MODEL_ERROR,
                                          f"encoder gave {audio.shape[0]} audio rows, expected {count}"))
                continue
            rows.append(Row(self.prompts.audio_prompt(clip.instruction, count), audio, clip.max_new_tokens,
                            stop, clip.on_stage, clip, timings={"front_end": front_end, "audio_tower": tower}))
        return rows

    # -- decoding -----------------------------------------------------------------------

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

        return replace(clip, on_stage=hook)

    def stream(self, feed: Feed, on_done: DoneHook, *, stop_ids: tuple[int, ...] | None = None,
               **limits: int) -> dict[str, float]:
        """Run clips from ``feed`` until it gives none and none is running (see the module's docstring).

        ``limits`` override the engine's ``max_rows`` / ``max_batch_tokens`` / ``prefill_tokens``
        for this stream; ``stop_ids`` the checkpoint's stop ids (``()``: every clip spends its
        budget, as benchmarks want). Returns the stream's totals (``Scheduler.stats``, front-end
        and tower seconds, ``outside``: seconds in ``feed`` and ``on_done``, and ``idle``: the
        part of ``outside`` spent in ``feed`` with no row running or waiting to join, when the
        device had nothing to do; ``idle_start`` is the part before the first clip came,
        ``idle_end`` the part after the last row left, the rest came between bursts). An
        exception raised by ``feed`` or ``on_done`` ends the stream and goes to the caller.
        """
        scheduler = self._scheduler(limits)
        stop = self._stop(stop_ids)
        arrivals: Arrivals[ClipRequest] = Arrivals(**self.join)
        stats = scheduler.stats

        def rows(free: int) -> list[Row] | None:
            nothing_to_do = not (scheduler.rows or scheduler.waiting or arrivals.pending)
            started = time.perf_counter()
            clips = list(feed(max(free - len(arrivals.pending), 0)))
            spent = time.perf_counter() - started
            stats["outside"] += spent
            if nothing_to_do:
                stats["idle"] += spent
                stats["idle_end" if stats["clips"] else "idle_start"] += spent
            if clips:  # the stream's idle so far was not its end
                stats["clips"] += len(clips)
                stats["idle_end"] = 0.0
            arrivals.add(clips)
            ready = arrivals.take(running=bool(scheduler.rows), room=free)
            if ready:
                return self._rows(ready, stop, on_done, scheduler.stats)
            return [] if arrivals.pending else None

        def finish(row: Row, outcome: list[int] | BaseException) -> None:
            result = outcome if isinstance(outcome, BaseException) else self._output(row)
            started = time.perf_counter()
            on_done(row.owner, result)
            scheduler.stats["outside"] += time.perf_counter() - started

        scheduler.run(rows, finish)
        return scheduler.stats

    def _scheduler(self, limits: dict[str, int]) -> Scheduler:
        scheduler = Scheduler(self.decoder, **{**self.limits, **limits}, padding_slack=self.padding_slack)
        # towers: tower calls; outside: seconds in the caller's feed and on_done (its waits for clips included);
        # idle: the part of outside in feed with nothing running or waiting (the device had nothing to do),
        # idle_start / idle_end: before the first clip / after the last row; clips: clips fed
        scheduler.stats.update(front_end=0.0, audio_tower=0.0, towers=0, outside=0.0, idle=0.0, idle_start=0.0,
                               idle_end=0.0, clips=0)
        return scheduler

    def _stop(self, stop_ids: tuple[int, ...] | None) -> frozenset[int]:
        return frozenset(self.model.config.tokens.stop if stop_ids is None else stop_ids)

    def _output(self, row: Row) -> ClipOutput:
        timings = dict(row.timings)
        timings["generate"] = time.perf_counter() - row.joined
        audio_tokens = 0 if row.audio is None else row.audio.shape[0]
        return ClipOutput(text=self.prompts.reply_text(row.tokens), tokens=list(row.tokens),
                          audio_tokens=audio_tokens, timings=timings)

    def warm_up(self, seconds: tuple[float, ...] = WARM_UP_SECONDS) -> float:
        """Run dummy clips through every stage and batch shape kind; returns the seconds taken.

        MLX compiles kernels on first use (CUDA) and builds shaders (Metal); a job should not
        pay for that. MLX's own kernels are specialised by dtype, rank and layout rather than
        by exact size, so what has to be covered is each kind of call: one clip alone, a
        padded tower batch, a left-padded prefill batch past the sliding window, rows joining
        a running batch and leaving it at different steps (docs/design.md, "Batching").
        cuDNN's convolution plans are per shape: on CUDA those are built as tower shapes
        first occur, a few dozen in all (``tower_buckets``).
        """
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        clips = [ClipRequest((0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32),
                             "Transcribe this audio.", 2 + i % 4) for i, s in enumerate(seconds)]
        clips.append(ClipRequest(None, "Say hello.", 3))
        self.run(clips[:1])
        late = clips[1:]

        def on_done(clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
            if isinstance(outcome, BaseException):
                raise outcome

        self.stream(lambda free: [late.pop(0) for _ in range(min(free, len(late), 2))], on_done, stop_ids=())
        return time.perf_counter() - started

    def generate(self, prompts: list[Prompt], max_new_tokens: int | list[int], *,
                 stop_ids: tuple[int, ...] | None = None, joins: list[int] | None = None,
                 **limits: int) -> list[list[int] | BaseException]:
        """Greedy tokens per prompt (or the exception that dropped it), batched as ``stream`` batches clips.

        ``stop_ids`` default to the checkpoint's (``()``: run every budget out). ``joins[i]``
        holds prompt i back until decode step ``joins[i]`` (rows joining mid-flight), or until no
        row runs: an empty batch takes no more steps.
        """
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        stop = self._stop(stop_ids)
        rows = [Row(p.ids, p.audio, n, stop, owner=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
        joins = joins or [0] * len(rows)
        pending = sorted(range(len(rows)), key=lambda i: joins[i])
        outputs: list[list[int] | BaseException | None] = [None] * len(rows)
        scheduler = self._scheduler(limits)

        def feed(free: int) -> list[Row] | None:
            step = scheduler.stats["steps"]
            if pending and not (scheduler.rows or scheduler.waiting):  # no step comes: the next due go now
                step = max(step, joins[pending[0]])
            ready = [i for i in pending[:free] if joins[i] <= step]
            for i in ready:
                pending.remove(i)
            return [rows[i] for i in ready] if ready or pending else None

        def finish(row: Row, outcome: list[int] | BaseException) -> None:
            outputs[row.owner] = outcome if isinstance(outcome, BaseException) else list(outcome)

        scheduler.run(feed, finish)
        return outputs

    def first_logits(self, prompts: list[Prompt]) -> np.ndarray:
        """Last-position logits [B, V] (float32) of the prompts, prefilled as one batch."""
        logits, _ = self.decoder.prefill([p.ids for p in prompts], [p.audio for p in prompts])
        return np.array(logits.astype(mx.float32))
