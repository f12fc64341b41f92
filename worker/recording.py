"""One decoded recording's work for the model: its chunks as clips, their replies as segments, the result.

The queue worker (``task.JobWork``) and ``audioq transcribe`` share this one path; it knows
nothing of Redis or storage. A ``Recording`` hands out one clip per chunk of its plan (the
``tag`` is the chunk's index), takes the outputs back in any order, and, for a question
about audio longer than one chunk, one text-only turn over the timestamped transcript once
every chunk is in. Each finished chunk becomes a ``ChunkText``: what the worker saves as it
completes, and what a later attempt passes back in (``saved``) to resume where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, Segment
from producer.settings import Settings
from producer.writers import timestamp
from worker.audio import SAMPLE_RATE
from worker.chunk_plan import MODEL_WINDOW_SECONDS, Chunk, ChunkPlan, plan_chunks
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine, StageHook
from worker.instructions import answer_instruction, instruction_for, split_translation, transcribe_instruction

ANSWER_TAG = "answer"  # the tag of the text-only answer turn; chunk clips carry their index


class ChunkText(BaseModel):
    """One finished chunk, as saved for resuming. ``digest`` ties it to the very samples it was made of,
    and to what else made its text: the model, the instruction and the token budget."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0)  # samples at 16 kHz, end exclusive
    end: int = Field(gt=0)
    digest: str
    text: str
    transcript: str | None = None
    tokens: int = Field(ge=0)
    audio_tokens: int = Field(ge=0)


def digest(samples: np.ndarray, made_by: str) -> str:
    """BLAKE2b of the float32 samples and of ``made_by`` (what else decides the text)."""
    hashed = hashlib.blake2b(np.ascontiguousarray(samples, dtype=np.float32).tobytes(), digest_size=8)
    hashed.update(made_by.encode())
    return hashed.hexdigest()


def plan_recording(samples: np.ndarray, settings: Settings) -> ChunkPlan:
    """The chunk plan under the settings' limits; more than ``max_chunks`` is ``audio_too_long``."""
    plan = plan_chunks(samples, max_chunk_seconds=settings.max_chunk_seconds,
                       skip_silence_seconds=settings.skip_silence_seconds,
                       min_chunk_seconds=settings.min_chunk_seconds, silence_floor_db=settings.silence_floor_db)
    if len(plan.chunks) > settings.max_chunks:
        raise AudioqError(FailureCode.AUDIO_TOO_LONG,
                          f"the audio ({samples.size / SAMPLE_RATE:.0f} s) is cut into {len(plan.chunks)} chunks of "
                          f"at most {settings.max_chunk_seconds:g} s; at most {settings.max_chunks} are allowed "
                          "(max_chunks)")
    return plan


def answer_tokens(engine: Engine) -> Callable[[str], int]:
    """How many prompt tokens a text-only turn with this instruction takes on ``engine``."""
    return lambda instruction: len(engine.prompts.text_prompt(instruction))


class Recording:
    """What the model must run for one recording and what its outputs make (see the module's docstring).

    ``on_stage(chunk)`` gives the stage hook for chunk ``chunk`` (None: the answer turn).
    """

    def __init__(self, samples: np.ndarray, plan: ChunkPlan, request: JobRequest, max_new_tokens: int, *,
                 count_tokens: Callable[[str], int], answer_context_tokens: int,
                 saved: dict[int, ChunkText] | None = None, model: str = "",
                 on_stage: Callable[[int | None], StageHook | None] = lambda chunk: None):
        self.samples = samples
        self.request = request
        self.max_new_tokens = max_new_tokens
        self.count_tokens = count_tokens
        self.answer_context_tokens = answer_context_tokens
        self.on_stage = on_stage
        asks = request.task == "prompt"
        if asks and samples.size <= MODEL_WINDOW_SECONDS * SAMPLE_RATE:
            self.units: tuple[Chunk, ...] = (Chunk(0, samples.size),)  # the question over the whole clip
        else:
            self.units = plan.chunks
        # A question over more than one chunk is answered from their transcripts.
        self.answers_after = asks and len(self.units) > 1
        self.instruction = (transcribe_instruction(request.language) if self.answers_after
                            else instruction_for(request))
        # A saved chunk is reused only if made by the same model, instruction and budget too.
        self.made_by = "\0".join((model, self.instruction, str(max_new_tokens)))
        self.done = {i: text for i, text in (saved or {}).items() if self._matches(i, text)}
        self.resumed = len(self.done)
        self.handed: set[int] = set(self.done)
        self.first_pending = 0  # every chunk before it is done (progress reads it at every decode step)
        self.answer: ClipOutput | None = None
        self.answer_handed = False
        self.timings: dict[str, float] = {}
        self.generated: dict[int | str, list[int]] = {}  # this run's token ids, by clip tag

    def _chunk_samples(self, index: int) -> np.ndarray:
        chunk = self.units[index]
        return self.samples[chunk.start:chunk.end]

    def _matches(self, index: int, text: ChunkText) -> bool:
        """Whether a saved chunk is this plan's chunk ``index`` over the same samples (else it is rerun)."""
        if not 0 <= index < len(self.units):
            return False
        chunk = self.units[index]
        return (text.start, text.end) == (chunk.start, chunk.end) and text.digest == digest(self._chunk_samples(index), self.made_by)

    @property
    def chunks(self) -> int:
        return len(self.units)

    def clips(self) -> list[ClipRequest]:
        """The clips ready now, each handed out once: every chunk not done, then the answer turn."""
        ready = [ClipRequest(self._chunk_samples(i), self.instruction, self.max_new_tokens, self.on_stage(i), tag=i)
                 for i in range(len(self.units)) if i not in self.handed]
        self.handed.update(clip.tag for clip in ready)
        if self.answers_after and len(self.done) == len(self.units) and not self.answer_handed:
            self.answer_handed = True
            ready.append(ClipRequest(None, self._answer_instruction(), self.max_new_tokens, self.on_stage(None),
                                     tag=ANSWER_TAG))
        return ready

    def _answer_instruction(self) -> str:
        lines = [f"[{timestamp(s.start, '.')} - {timestamp(s.end, '.')}] {s.text}" for s in self.segments() if s.text]
        instruction = answer_instruction(self.request.prompt or "", lines)
        tokens = self.count_tokens(instruction)
        if tokens > self.answer_context_tokens:
            raise AudioqError(FailureCode.AUDIO_TOO_LONG,
                              f"the question over this audio's transcript is {tokens} tokens; at most "
                              f"{self.answer_context_tokens} are allowed (answer_context_tokens): ask about a "
                              "shorter recording, or transcribe it and read the transcript")
        return instruction

    def clip_done(self, clip: ClipRequest, output: ClipOutput) -> ChunkText | None:
        """Take one clip's output; returns the chunk it finished (None for the answer turn)."""
        for stage, seconds in output.timings.items():
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.generated[clip.tag] = output.tokens
        if clip.tag == ANSWER_TAG:
            self.answer = output
            return None
        chunk, text, transcript = self.units[clip.tag], output.text.strip(), None
        if self.request.task == "translate":
            transcript, text = split_translation(text, self.request.target_language or "")
        finished = ChunkText(start=chunk.start, end=chunk.end, digest=digest(clip.samples, self.made_by), text=text,
                             transcript=transcript, tokens=len(output.tokens), audio_tokens=output.audio_tokens)
        self.done[clip.tag] = finished
        return finished

    def token_ids(self) -> list[int]:
        """The ids generated in this run: chunk by chunk, then the answer turn's."""
        order = sorted(t for t in self.generated if t != ANSWER_TAG) + [ANSWER_TAG]
        return [token for tag in order for token in self.generated.get(tag, [])]

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.units) and (not self.answers_after or self.answer is not None)

    def progress(self) -> tuple[int, float]:
        """(chunks done, seconds of the recording finished up to): both only grow."""
        while self.first_pending < len(self.units) and self.first_pending in self.done:
            self.first_pending += 1
        pending = self.first_pending < len(self.units)
        upto = self.units[self.first_pending].start if pending else self.samples.size
        return len(self.done), round(upto / SAMPLE_RATE, 3)

    def segments(self) -> list[Segment]:
        """The finished chunks' segments, in the recording's order."""
        return [Segment(start=round(t.start / SAMPLE_RATE, 3), end=round(t.end / SAMPLE_RATE, 3), text=t.text,
                        transcript=t.transcript) for _, t in sorted(self.done.items())]

    def result_fields(self) -> dict:
        """The ``JobResult`` fields this recording decides (the caller adds model, worker, metadata, I/O timings)."""
        segments = self.segments()
        texts = [s.text for s in segments if s.text]
        answer_tokens = len(self.answer.tokens) if self.answer is not None else 0
        return dict(
            text=self.answer.text if self.answer is not None else " ".join(texts),
            segments=segments,
            transcript=" ".join(s.transcript for s in segments if s.transcript)
            if self.request.task == "translate" else None,
            audio_seconds=round(self.samples.size / SAMPLE_RATE, 3),
            chunks=len(self.units),
            speech_seconds=round(sum(c.end - c.start for c in self.units) / SAMPLE_RATE, 3),
            resumed_chunks=self.resumed,
            tokens=sum(t.tokens for t in self.done.values()) + answer_tokens,
            audio_tokens=sum(t.audio_tokens for t in self.done.values()),
            timings=dict(self.timings),
        )


def run_alone(engine: Engine, work) -> None:
    """Run one piece of work's clips (a ``Recording``, a ``JobWork``) through ``engine``; the first
    clip that fails raises. Clips the work hands out later (an answer turn) are fed as they appear."""

    waiting: list[ClipRequest] = []

    def feed(free: int) -> list[ClipRequest]:
        waiting.extend(work.clips())
        taken = waiting[:free]
        del waiting[:free]
        return taken

    def on_done(clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        if isinstance(outcome, BaseException):
            raise outcome
        work.clip_done(clip, outcome)

    engine.stream(feed, on_done)
