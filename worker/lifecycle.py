"""One job's record while a worker runs it: claim, progress, deadline, cancel, outcome.

Nothing here knows about audio or the model, so the same ``JobRun`` serves one clip alone
and a batch of clips from several jobs: each clip's ``on_stage`` hook calls its own job's
``stage``, and each run records its own result or failure.

``stage`` is the cooperative check point. ``SimpleWorker`` cannot kill a running job
(``send_stop_job_command`` is a no-op without a work horse) and RQ's SIGALRM cannot
interrupt a long native MLX call, so the deadline and the cancel flag are checked at every
stage boundary and, throttled, at every decode step, raising ``timeout`` or ``canceled``
out of the engine. In a batch, the cancel check of a prepared job runs on the batch's
records thread (``JobRun.write``), and the batch ends the job with what it raises.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from rq.job import Job, Retry

from producer import record
from producer.failures import AudioqError, FailureCode
from producer.schema import JobFailure, Progress
from producer.settings import Settings
from worker.failures import failure_for

# While a stage repeats (the engine reports "generate" before every decode step), the
# cancel flag is read at most this often, and progress is written only when the stage changes.
CHECK_INTERVAL = 1.0

log = logging.getLogger("audioq.worker")


class JobFailed(Exception):
    """Raised out of the job function once its failure is on the record, so RQ fails the job.

    Its text, ``code: message``, ends RQ's ``exc_string``.
    """

    def __init__(self, failure: JobFailure):
        super().__init__(f"{failure.code.value}: {failure.message}")
        self.failure = failure


def record_failure(job: Job, failure: JobFailure) -> None:
    job.meta[record.META_FAILURE] = failure.model_dump(mode="json")
    job.save_meta()


def at_once(action: Callable[[], None]) -> None:
    """``JobRun.write`` outside a batch's records thread: the record's I/O runs in the calling thread."""
    action()


class JobRun:
    def __init__(self, job: Job, settings: Settings, worker: str):
        self.job = job
        self.settings = settings
        self.worker = worker
        self.started = time.monotonic()
        self.waited = 0.0  # seconds not charged to the job: it waited for other jobs of its batch
        self.attempt = int(job.meta.get(record.META_ATTEMPT, 0)) + 1
        self.audio_seconds: float | None = None
        self.current: tuple | None = None  # the stage and progress last entered
        self.progress: dict | None = None  # its Progress, not yet on the record
        self.sync_queued = False  # a ``sync`` is handed to ``write`` and has not started yet
        self.lock = threading.Lock()  # for the three above, which ``stage`` and a ``sync`` elsewhere share
        self.checked_at = -math.inf
        # Where the record's reads and writes run (``sync``, chunk saves): here, by default. A
        # batch hands them to its records thread, so the thread that runs the model never
        # waits for Redis (docs/design.md, "The records thread").
        self.write: Callable[[Callable[[], None]], None] = at_once

    @property
    def budget(self) -> float:
        """Seconds this job may run (``Settings.job_budget`` of its audio, once decoded)."""
        return self.settings.job_budget(self.audio_seconds)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds charged to the job: since its claim, less what it waited for the other jobs of its batch."""
        return (time.monotonic() if now is None else now) - self.started - self.waited

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which the budget runs out if the job waits no more: storage stops waiting there."""
        return self.started + self.waited + self.budget

    def claim(self) -> None:
        """Count the attempt and drop the previous attempt's failure, then enter ``claimed``."""
        self.job.meta[record.META_ATTEMPT] = self.attempt
        self.job.meta.pop(record.META_FAILURE, None)
        self.stage("claimed")

    def stage(self, name: str, **where) -> None:
        """Enter (or stay in) stage ``name``: raise on deadline, then ``sync`` with the record.

        ``where``: the other ``Progress`` fields (which chunk, how much is done); progress is
        written when the stage or any of them changes, the cancel flag read at most every
        ``CHECK_INTERVAL``. Where ``write`` runs ``sync`` elsewhere, a cancel is raised there.
        """
        now = time.monotonic()
        if self.elapsed(now) > self.budget:
            s = self.settings
            seconds = "the longest allowed" if self.audio_seconds is None else f"{self.audio_seconds:.1f} s of"
            shared = (f" ({now - self.started:.1f} s since its claim, {self.waited:.1f} s of them its batch's "
                      f"other jobs' share)" if self.waited >= 0.05 else "")
            raise AudioqError(FailureCode.TIMEOUT,
                              f"the job ran {self.elapsed(now):.1f} s{shared}, past its budget of {self.budget:.1f} s "
                              f"(job_timeout_base {s.job_timeout_base:g} s + {s.job_timeout_per_audio_second:g} s "
                              f"per second of audio, for {seconds} audio), at stage {name}")
        position = (name, *sorted(where.items()))
        if position == self.current and now - self.checked_at < CHECK_INTERVAL:
            return
        self.checked_at = now
        with self.lock:
            if position != self.current:
                self.current = position
                self.progress = Progress(stage=name, **where).model_dump(mode="json")
            queue, self.sync_queued = not self.sync_queued, True  # one pending sync: it reads the newest stage
        if queue:
            self.write(self.sync)

    def sync(self) -> None:
        """Raise if the job was canceled; else put the newest progress on the record (through ``write``)."""
        with self.lock:
            self.sync_queued = False
            name, progress = self.current[0], self.progress
        if self.job.connection.exists(record.cancel_key(self.job.id)):
            raise AudioqError(FailureCode.CANCELED, f"canceled on request, at stage {name}")
        if progress is not None:
            self.job.meta[record.META_PROGRESS] = progress
            self.job.save_meta()
            with self.lock:
                if self.progress is progress:  # not replaced meanwhile by a newer stage, which a sync writes next
                    self.progress = None

    def failure(self, exc: BaseException) -> JobFailure:
        return failure_for(exc, attempt=self.attempt, worker=self.worker)

    def retry_later(self, failure: JobFailure) -> Retry | None:
        """A ``Retry`` for RQ when storage was unavailable and retries remain, else None.

        Returned (not raised) from the job so that only this code is retried: RQ's
        enqueue-time ``Retry`` would retry every failure, bad audio included. RQ schedules
        the next attempt after ``storage_retry_backoff[n]`` seconds.
        """
        done = self.job.number_of_retries or 0
        if failure.code != FailureCode.STORAGE_UNAVAILABLE:
            return None
        retries = self.settings.storage_retries
        if done >= retries:
            log.warning("job %s: storage unavailable on attempt %d (%s); no retries left (storage_retries = %d)",
                        self.job.id, self.attempt, failure.message, retries)
            return None
        self.job.meta[record.META_RETRY] = failure.model_dump(mode="json")
        self.job.save_meta()
        wait = Retry.get_interval(done, self.settings.storage_retry_backoff)
        due = datetime.now(timezone.utc) + timedelta(seconds=wait)
        log.warning("job %s: storage unavailable on attempt %d (%s); retry %d of %d in %g s, at %s",
                    self.job.id, self.attempt, failure.message, done + 1, retries, wait,
                    due.isoformat(timespec="seconds"))
        return Retry(max=retries, interval=self.settings.storage_retry_backoff)

    def fail(self, failure: JobFailure) -> JobFailed:
        """Put ``failure`` on the record; the caller raises the returned exception."""
        record_failure(self.job, failure)
        return JobFailed(failure)
