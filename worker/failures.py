"""The one place where an exception becomes a ``FailureCode`` and a sentence.

Steps that know what went wrong (storage, audio decode, the engine, the job's own checks)
raise ``AudioqError`` with the code and a message naming what was found and what is
allowed; those pass through unchanged. Everything else reaching a job's boundary is
classified here, so a job record never carries a bare traceback as its reason. (A cold
shutdown's ``SystemExit`` never gets here: the worker resolves that job like a lost one,
see ``process.AudioWorker.abandon``.)
"""

from __future__ import annotations

from producer.failures import AudioqError, FailureCode
from producer.printable import printable
from producer.schema import JobFailure
from rq.exceptions import DeserializationError
from rq.timeouts import JobTimeoutException

MAX_MESSAGE = 300  # characters of an unexpected exception's text kept in the message
SHUTDOWN = (SystemExit, KeyboardInterrupt)  # a cold shutdown, as RQ's signal handlers raise it in the main thread


class HardTimeLimit(BaseException):
    """The batch's hard time limit fired (its SIGALRM). A ``BaseException``, unlike RQ's
    ``JobTimeoutException``: the engine's handlers, which fail the rows of a step or a
    prefill group on an ``Exception``, let it through, so that the batch ends the one job
    that ran out of time instead of every job that shared the interrupted call."""


def classify(exc: BaseException) -> AudioqError:
    """The failure code and message for any exception that ended a job."""
    if isinstance(exc, AudioqError):
        return exc
    if isinstance(exc, (JobTimeoutException, HardTimeLimit)):
        # RQ's hard limit (SIGALRM) fired: a step ran past the cooperative deadline without
        # returning to a stage boundary, e.g. one long native call.
        return AudioqError(FailureCode.TIMEOUT, f"the job hit the worker's hard time limit: {exc}")
    if isinstance(exc, DeserializationError):
        return AudioqError(FailureCode.INVALID_REQUEST,
                           "the job's data is not JSON: audioq jobs are written with RQ's JSON serializer")
    if isinstance(exc, MemoryError):
        return AudioqError(FailureCode.MODEL_ERROR, "the worker ran out of memory while running this job")
    text = " ".join(str(exc).split())[:MAX_MESSAGE]
    return AudioqError(FailureCode.MODEL_ERROR, f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def failure_for(exc: BaseException, *, attempt: int, worker: str | None) -> JobFailure:
    """The ``JobFailure`` written to the job record for ``exc``."""
    error = classify(exc)
    # Messages name keys and URIs from the request; the record's copy is printed and logged as it is.
    return JobFailure(code=error.code, message=printable(error.message), retryable=error.retryable,
                      attempt=max(1, attempt), worker=worker)
