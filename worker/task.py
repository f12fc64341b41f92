"""``process_audio_job``: the function every audioq job names (``record.TASK_FUNC``).

It runs in the worker process and reaches the resident engine through ``resident()``,
installed once by the worker at start-up; a job never loads a model. The steps follow the
data path — request → fetch → decode → engine → result → outputs — and take lists where
the engine does, so that batching several jobs (or the chunks of long audio) through one
``engine.run`` only changes how ``process_audio_job`` groups them. Everything that touches
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
from dataclasses import dataclass, field

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Retry

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, JobResult, Segment
from producer.settings import Settings
from worker.audio import decode_audio
from worker.gemma4.features import SAMPLE_RATE
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine
from worker.instructions import instruction_for
from worker.lifecycle import JobRun
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


@dataclass
class Prepared:
    """One job's clip, decoded and ready for the engine."""

    run: JobRun
    request: JobRequest
    clip: ClipRequest
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return self.clip.samples.size / SAMPLE_RATE


def parse_request(raw: object) -> JobRequest:
    try:
        return JobRequest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        raise AudioqError(FailureCode.INVALID_REQUEST, f"invalid job request: {problems}") from None


def token_budget(request: JobRequest, settings: Settings) -> int:
    if request.max_new_tokens is None:
        return settings.default_max_new_tokens
    if request.max_new_tokens > settings.max_new_tokens_limit:
        raise AudioqError(FailureCode.INVALID_REQUEST,
                          f"max_new_tokens {request.max_new_tokens} is above this worker's limit "
                          f"of {settings.max_new_tokens_limit}")
    return request.max_new_tokens


def prepare(run: JobRun, request: JobRequest, home: Resident) -> Prepared:
    """Check the output location, then fetch and decode one job's audio into an engine clip."""
    budget = token_budget(request, home.settings)
    if request.output_uri:
        check_output(request.output_uri, home.settings)
    timings = {}
    run.stage("fetch")
    started = time.perf_counter()
    with fetched_audio(request.audio_uri, home.settings) as path:
        timings["fetch"] = time.perf_counter() - started
        run.stage("decode_audio")
        started = time.perf_counter()
        max_seconds = min(home.settings.max_audio_seconds, home.engine.max_clip_seconds)
        samples = decode_audio(path, max_seconds=max_seconds)
        timings["decode_audio"] = time.perf_counter() - started
    item = Prepared(run, request, ClipRequest(samples, instruction_for(request), budget), timings)
    run.audio_seconds = item.audio_seconds
    return item


def infer(engine: Engine, batch: list[Prepared]) -> list[ClipOutput]:
    """One engine call for the whole batch; every run checks its deadline and cancel flag."""

    def on_stage(stage: str) -> None:
        for item in batch:
            item.run.stage(stage)

    return engine.run([item.clip for item in batch], on_stage=on_stage)


def finish(item: Prepared, output: ClipOutput, home: Resident) -> JobResult:
    """The job's result, written to its output URI when it asked for one."""
    seconds = round(item.audio_seconds, 3)
    result = JobResult(
        text=output.text, segments=[Segment(start=0.0, end=seconds, text=output.text)],
        model=home.engine.model_id, audio_seconds=seconds, timings={**item.timings, **output.timings},
        worker=home.worker_name, tokens=len(output.tokens), audio_tokens=output.audio_tokens,
        metadata=item.request.metadata)
    prefix = item.request.output_uri
    if prefix:
        item.run.stage("write")
        started = time.perf_counter()
        result.output_uris = list(output_uris(prefix, item.run.job.id))
        write_outputs(prefix, item.run.job.id, result, home.settings)
        result.timings["write"] = time.perf_counter() - started
    return result


def process_audio_job(request: dict) -> dict | Retry:
    """Run one job; its ``JobResult`` dict is RQ's return value.

    On failure the ``JobFailure`` is written to the job's meta first, then ``JobFailed``
    makes RQ mark the job failed; a ``Retry`` is returned when storage may recover.
    """
    home = resident()
    run = JobRun(get_current_job(), home.settings, home.worker_name)
    try:
        run.claim()
        item = prepare(run, parse_request(request), home)
        (output,) = infer(home.engine, [item])
        return finish(item, output, home).model_dump(mode="json")
    except Exception as exc:
        failure = run.failure(exc)
        retry = run.retry_later(failure)
        if retry is not None:
            return retry
        raise run.fail(failure) from None
