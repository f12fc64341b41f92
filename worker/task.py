"""``process_audio_job``: the function every audioq job names (``record.TASK_FUNC``).

It runs in the worker process and reaches the resident engine through ``resident()``,
installed once by the worker at start-up; a job never loads a model. The steps follow the
data path — request → fetch → decode → engine → result → outputs — and live in ``JobWork``,
one job's side of the seam with the engine, so that a worker holding several jobs (and the
chunks of long audio) feeds them all into one ``Engine.stream``. Everything that touches
the job record (claim, progress, deadline, cancel, failure, retry) belongs to ``JobRun``.

Policy choices:
- ``max_new_tokens`` above ``settings.max_new_tokens_limit`` is refused (``invalid_request``)
  rather than clamped: a silently shortened transcript looks like a complete one.
- ``storage_unavailable`` is retried ``settings.storage_retries`` times with
  ``storage_retry_backoff``; every other failure is final for this attempt.
- The output location is checked before the audio is fetched (``storage.check_output``),
  so a job that could never deliver its result fails before the model runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job, Retry

from producer import record
from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, JobResult
from producer.settings import Settings
from worker.audio import SAMPLE_RATE, decode_audio
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine, StageHook
from worker.lifecycle import JobRun
from worker.recording import ChunkText, Recording, answer_tokens, plan_recording, run_alone
from worker.request import parse_request
from worker.storage import check_output, fetched_audio, output_uris, write_outputs


@dataclass
class Resident:
    """What a worker process holds across jobs."""

    engine: Engine
    settings: Settings
    worker_name: str


_resident: Resident | None = None


def install(resident: Resident | None) -> None:
    global _resident
    _resident = resident


def resident() -> Resident:
    if _resident is None:
        raise AudioqError(FailureCode.MODEL_ERROR,
                          "no engine is loaded in this process: audioq jobs run in `audioq worker`")
    return _resident


def token_budget(request: JobRequest, settings: Settings) -> int:
    if request.max_new_tokens is None:
        return settings.default_max_new_tokens
    if request.max_new_tokens > settings.max_new_tokens_limit:
        raise AudioqError(FailureCode.INVALID_REQUEST,
                          f"max_new_tokens {request.max_new_tokens} is above this worker's limit "
                          f"of {settings.max_new_tokens_limit}")
    return request.max_new_tokens


class JobWork:
    """One job from claim to result: the clips the engine must run for it, and what their outputs make.

    The seam between a job and the engine. ``prepare`` does the job's own I/O (output check,
    fetch, decode) and plans its chunks; ``clips`` hands the engine what is ready to run;
    ``clip_done`` takes each output back, in any order, and saves a finished chunk on the
    record at once; once ``complete``, ``result`` builds (and writes) the job's result. A
    worker may hold many of these at once and feed all their clips into one ``Engine.stream``.
    Failures of any step go through ``failed``.
    """

    def __init__(self, job: Job, raw_request: object, home: Resident):
        self.job = job
        self.home = home
        self.run = JobRun(job, home.settings, home.worker_name)
        self.raw_request = raw_request
        self.request: JobRequest | None = None
        self.recording: Recording | None = None
        self.timings: dict[str, float] = {}

    def prepare(self) -> None:
        """Claim the job, check its request and output location, fetch and decode its audio, plan its chunks."""
        self.run.claim()
        settings = self.home.settings
        self.request = request = parse_request(self.raw_request, settings, self.home.engine.prompts)
        budget = token_budget(request, settings)
        if request.output_uri:
            check_output(request.output_uri, settings, deadline=self.run.deadline)
        self.run.stage("fetch")
        started = time.perf_counter()
        with fetched_audio(request.audio_uri, settings, deadline=self.run.deadline) as path:
            self.timings["fetch"] = time.perf_counter() - started
            self.run.stage("decode_audio")
            started = time.perf_counter()
            samples = decode_audio(path, max_seconds=settings.max_audio_seconds)
        self.timings["decode_audio"] = time.perf_counter() - started
        self.run.audio_seconds = samples.size / SAMPLE_RATE
        started = time.perf_counter()
        plan = plan_recording(samples, settings)
        self.timings["plan_chunks"] = time.perf_counter() - started
        self.recording = Recording(samples, plan, request, budget, count_tokens=answer_tokens(self.home.engine),
                                   answer_context_tokens=settings.answer_context_tokens,
                                   saved=saved_chunks(self.job), model=self.home.engine.model_id,
                                   on_stage=self._chunk_hook)

    def _chunk_hook(self, chunk: int | None) -> StageHook:
        """The check point of chunk ``chunk``'s clip (None: the answer turn): deadline, cancel, progress."""

        def hook(stage: str) -> None:
            done, seconds = self.recording.progress()
            self.run.stage(stage, chunk=None if chunk is None else chunk + 1, chunks=self.recording.chunks,
                           chunks_done=done, audio_seconds_done=seconds, audio_seconds=self.run.audio_seconds)

        return hook

    def clips(self) -> list[ClipRequest]:
        """The clips ready to run now (each handed out once)."""
        return [] if self.recording is None else self.recording.clips()

    def clip_done(self, clip: ClipRequest, output: ClipOutput) -> None:
        finished = self.recording.clip_done(clip, output)
        if finished is not None:
            self.run.write(lambda: save_chunk(self.job, clip.tag, finished, self.home.settings))

    @property
    def complete(self) -> bool:
        return self.recording is not None and self.recording.complete

    def result(self) -> dict:
        """The job's ``JobResult`` dict (RQ's return value), written to its output URI when it asked for one."""
        fields = self.recording.result_fields()
        result = JobResult(**{**fields, "timings": {**self.timings, **fields["timings"]}},
                           model=self.home.engine.model_id, worker=self.home.worker_name,
                           metadata=self.request.metadata)
        prefix, formats = self.request.output_uri, self.request.output_formats
        if prefix:
            self.run.stage("write")
            started = time.perf_counter()
            result.output_uris = list(output_uris(prefix, self.job.id, formats))
            write_outputs(prefix, self.job.id, result, self.home.settings, formats, deadline=self.run.deadline)
            result.timings["write"] = time.perf_counter() - started
        self.run.write(lambda: self.job.connection.delete(record.chunks_key(self.job.id)))  # the result holds them now
        return result.model_dump(mode="json")

    def failed(self, exc: BaseException) -> Retry:
        """A ``Retry`` for RQ when storage may recover; otherwise the failure goes on the record and
        ``JobFailed`` is raised. Finished chunks stay saved, so a retry or a requeue resumes after them."""
        failure = self.run.failure(exc)
        retry = self.run.retry_later(failure)
        if retry is not None:
            return retry
        raise self.run.fail(failure) from None


def saved_chunks(job: Job) -> dict[int, ChunkText]:
    """The chunks earlier attempts finished. Anyone who can write Redis can write this hash, so a
    field that is not a chunk index holding a valid ``ChunkText`` is ignored, and ``Recording``
    reruns any chunk whose bounds or samples differ from the saved ones."""
    saved: dict[int, ChunkText] = {}
    for field, value in job.connection.hgetall(record.chunks_key(job.id)).items():
        try:
            saved[int(field)] = ChunkText.model_validate_json(value)
        except (ValueError, ValidationError):
            continue
    return saved


def save_chunk(job: Job, index: int, finished: ChunkText, settings: Settings) -> None:
    """One hash field per chunk, so a save costs the same however many are done. The hash lives as
    long as a failed job's record, for a requeue to resume from."""
    key = record.chunks_key(job.id)
    with job.connection.pipeline() as pipe:
        pipe.hset(key, str(index), finished.model_dump_json())
        pipe.expire(key, max(settings.failure_ttl, settings.result_ttl))
        pipe.execute()


def process_audio_job(request: dict) -> dict | Retry:
    """Run one job; its ``JobResult`` dict is RQ's return value.

    On failure the ``JobFailure`` is written to the job's meta first, then ``JobFailed``
    makes RQ mark the job failed; a ``Retry`` is returned when storage may recover.
    """
    home = resident()
    work = JobWork(get_current_job(), request, home)
    try:
        work.prepare()
        run_alone(home.engine, work)
        return work.result()
    except Exception as exc:
        return work.failed(exc)
