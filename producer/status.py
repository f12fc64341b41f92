"""What the producer reports: a job's status, the outcome of an action, queue and worker info.

The job record in Redis is the source of truth. This module only turns what was read
(an RQ ``Job`` plus its latest ``Result``) into audioq's vocabulary. Each RQ status maps
to one audioq state, and every failure ends up as a ``JobFailure`` with a stable code,
even when RQ failed the job before the worker could write one (abandoned job, timeout,
raw exception).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.results import Result

from producer import record
from producer.failures import RETRYABLE, FailureCode
from producer.schema import JobFailure, JobRequest, JobResult, Progress

State = Literal["queued", "scheduled", "deferred", "started", "finished", "failed", "canceled", "not_found",
                "unreadable"]
# "unreadable": the record exists but cannot be read (see ``JobStatus.reason``); nothing a
# reader waits for will change that, so it ends a ``wait`` like a failure.
TERMINAL_STATES = frozenset({"finished", "failed", "canceled", "not_found", "unreadable"})

# RQ's own statuses → ours. "stopped" only happens when someone stops a job by hand.
_RQ_STATES: dict[str, State] = {
    RQStatus.CREATED: "queued",
    RQStatus.QUEUED: "queued",
    RQStatus.SCHEDULED: "scheduled",
    RQStatus.DEFERRED: "deferred",
    RQStatus.STARTED: "started",
    RQStatus.FINISHED: "finished",
    RQStatus.FAILED: "failed",
    RQStatus.STOPPED: "failed",
    RQStatus.CANCELED: "canceled",
}


class JobStatus(BaseModel):
    """Everything a caller may want to know about one job, in one read."""

    id: str
    state: State
    queue: str | None = None
    position: int | None = None
    progress: Progress | None = None
    attempt: int | None = None
    result: JobResult | None = None
    failure: JobFailure | None = None
    retry: JobFailure | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    request: JobRequest | None = None
    reason: str | None = None  # why an unreadable record cannot be read

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class EnqueueOutcome(BaseModel):
    """``created`` is False when a job with this id already existed (nothing was written)."""

    job_id: str
    created: bool
    queue: str

    @property
    def outcome(self) -> str:
        return "created" if self.created else "exists"


class ActionOutcome(BaseModel):
    """What ``cancel`` or ``requeue`` did to one job, and why not when it did nothing."""

    job_id: str
    action: Literal["canceled", "cancel_requested", "requeued", "unchanged", "not_found"]
    state: State
    message: str


class QueueInfo(BaseModel):
    name: str
    queued: int
    started: int
    finished: int
    failed: int
    canceled: int
    scheduled: int
    deferred: int
    oldest_queued_seconds: float | None = None


class WorkerInfo(BaseModel):
    name: str
    state: str
    current_job: str | None = None
    last_heartbeat: datetime | None = None
    queues: list[str]
    successful_jobs: int = 0
    failed_jobs: int = 0


class Info(BaseModel):
    queues: list[QueueInfo]
    workers: list[WorkerInfo]


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed without an error message"


def failure_from_exc_string(exc_string: str | None, attempt: int = 1, worker: str | None = None,
                            at: datetime | None = None) -> JobFailure:
    """A failure for a job that RQ failed without audioq's own ``META_FAILURE``.

    That happens when the worker died (RQ's maintenance moves the job to the failed
    registry with ``AbandonedJobError``), when RQ's death penalty fired
    (``JobTimeoutException``), or when something raised outside the worker's own
    error mapping.
    """
    text = exc_string or ""
    message = _last_line(text)
    if "AbandonedJobError" in text:  # RQ's words ("Moved to FailedJobRegistry, ...") tell a user nothing
        code = FailureCode.WORKER_LOST
        message = (f"worker {worker or '(unknown)'} stopped while running the job and RQ's cleanup failed it; "
                   f"`audioq requeue` runs it again")
    elif "JobTimeoutException" in text:
        code = FailureCode.TIMEOUT
    else:
        code = FailureCode.MODEL_ERROR
    return JobFailure(code=code, message=message, retryable=code in RETRYABLE,
                      attempt=max(1, attempt), worker=worker or None,
                      at=_utc(at) or datetime.now(timezone.utc))


def _parse(model: type[BaseModel], value: Any) -> Any:
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def build_status(job_id: str, job: Job | None, *, position: int | None = None,
                 latest: Result | None = None) -> JobStatus:
    """Assemble a ``JobStatus`` from a fetched job, its queue position and latest result.

    A job that failed with failure code ``canceled`` (the worker honoured a cancel
    request while running it) is reported as ``canceled``, like one canceled while
    queued, although RQ files it under failed.
    """
    if job is None:
        return JobStatus(id=job_id, state="not_found")
    state = _RQ_STATES.get(job.get_status(refresh=False), "queued")
    meta = job.meta if isinstance(job.meta, dict) else {}
    attempt = meta.get(record.META_ATTEMPT)
    attempt = attempt if isinstance(attempt, int) else None
    status = JobStatus(
        id=job_id, state=state, queue=job.origin or None, attempt=attempt,
        enqueued_at=_utc(job.enqueued_at), started_at=_utc(job.started_at), ended_at=_utc(job.ended_at),
        request=_parse(JobRequest, meta.get(record.META_REQUEST)),
    )
    if state in ("queued", "scheduled", "started"):
        # Why an earlier attempt was put back (storage retry, lost worker), if one was.
        status.retry = _parse(JobFailure, meta.get(record.META_RETRY))
    if state == "queued":
        status.position = position
    elif state == "started":
        status.progress = _parse(Progress, meta.get(record.META_PROGRESS))
    elif state == "finished":
        value = latest.return_value if latest is not None and latest.type == Result.Type.SUCCESSFUL else None
        status.result = _parse(JobResult, value)
        if status.result is None:
            status.state = "failed"
            status.failure = JobFailure(
                code=FailureCode.MODEL_ERROR, retryable=False, attempt=max(1, attempt or 1),
                message="the job finished but its result is missing or not a JobResult",
                worker=job.worker_name)
    elif state in ("failed", "canceled"):
        status.failure = _parse(JobFailure, meta.get(record.META_FAILURE))
        if status.failure is None:
            status.failure = _synthesised_failure(job, state, attempt or 1, latest)
        if status.failure.code == FailureCode.CANCELED:
            status.state = "canceled"
    return status


def _synthesised_failure(job: Job, state: str, attempt: int, latest: Result | None) -> JobFailure:
    if state == "canceled" or job.get_status(refresh=False) == RQStatus.STOPPED:
        return JobFailure(code=FailureCode.CANCELED, message="the job was canceled", retryable=False,
                          attempt=max(1, attempt), worker=job.worker_name or None,
                          at=_utc(job.ended_at) or datetime.now(timezone.utc))
    if latest is not None and latest.type == Result.Type.FAILED:
        return failure_from_exc_string(latest.exc_string, attempt, latest.worker_name or job.worker_name,
                                       latest.created_at)
    return failure_from_exc_string(None, attempt, job.worker_name, job.ended_at)
