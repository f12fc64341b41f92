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

import numpy as np

from rq import get_current_job
from rq.job import Job, Retry

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, JobResult, Segment
from producer.settings import Settings
from worker.audio import decode_audio
from worker.gemma4.features import SAMPLE_RATE
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine
from worker.instructions import instruction_for
from worker.lifecycle import JobRun
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
    fetch, decode); ``clips`` hands the engine what is ready to run; ``clip_done`` takes each
    output back; once ``complete``, ``result`` builds (and writes) the job's result. A worker
    may hold many of these at once and feed all their clips into one ``Engine.stream``.
    Failures of any step go through ``failed``.
    """

    def __init__(self, job: Job, raw_request: object, home: Resident):
        self.job = job
        self.home = home
        self.run = JobRun(job, home.settings, home.worker_name)
        self.raw_request = raw_request
        self.request: JobRequest | None = None
        self.samples: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.pending: list[ClipRequest] = []
        self.outputs: list[ClipOutput] = []

    @property
    def audio_seconds(self) -> float:
        return 0.0 if self.samples is None else self.samples.size / SAMPLE_RATE

    def prepare(self) -> None:
        """Claim the job, check its request and output location, then fetch and decode its audio."""
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
            max_seconds = min(settings.max_audio_seconds, self.home.engine.max_clip_seconds)
            self.samples = decode_audio(path, max_seconds=max_seconds)
            self.timings["decode_audio"] = time.perf_counter() - started
        self.run.audio_seconds = self.audio_seconds
        self.pending = [ClipRequest(self.samples, instruction_for(request), budget, on_stage=self.run.stage)]

    def clips(self) -> list[ClipRequest]:
        """The clips ready to run now (each handed out once)."""
        ready, self.pending = self.pending, []
        return ready

    def clip_done(self, clip: ClipRequest, output: ClipOutput) -> None:
        self.outputs.append(output)

    @property
    def complete(self) -> bool:
        return self.request is not None and not self.pending and len(self.outputs) == 1

    def result(self) -> dict:
        """The job's ``JobResult`` dict (RQ's return value), written to its output URI when it asked for one."""
        (output,) = self.outputs
        seconds = round(self.audio_seconds, 3)
        result = JobResult(
            text=output.text, segments=[Segment(start=0.0, end=seconds, text=output.text)],
            model=self.home.engine.model_id, audio_seconds=seconds, timings={**self.timings, **output.timings},
            worker=self.home.worker_name, tokens=len(output.tokens), audio_tokens=output.audio_tokens,
            metadata=self.request.metadata)
        prefix = self.request.output_uri
        if prefix:
            self.run.stage("write")
            started = time.perf_counter()
            result.output_uris = list(output_uris(prefix, self.job.id))
            write_outputs(prefix, self.job.id, result, self.home.settings, deadline=self.run.deadline)
            result.timings["write"] = time.perf_counter() - started
        return result.model_dump(mode="json")

    def failed(self, exc: BaseException) -> Retry:
        """A ``Retry`` for RQ when storage may recover; otherwise the failure goes on the record and
        ``JobFailed`` is raised."""
        failure = self.run.failure(exc)
        retry = self.run.retry_later(failure)
        if retry is not None:
            return retry
        raise self.run.fail(failure) from None


def run_alone(engine: Engine, work: JobWork) -> None:
    """Run one job's clips through the engine; the first clip that fails raises."""

    def on_done(clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        if isinstance(outcome, BaseException):
            raise outcome
        work.clip_done(clip, outcome)

    engine.stream(lambda free: work.clips()[:free] if free else [], on_done)


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
