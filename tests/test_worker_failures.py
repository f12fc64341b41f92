"""The one exception → failure-code map."""

from __future__ import annotations

import pytest
from rq.exceptions import DeserializationError
from rq.timeouts import JobTimeoutException

from producer.failures import AudioqError, FailureCode
from worker.failures import MAX_MESSAGE, classify, failure_for


def test_audioq_errors_pass_through_unchanged():
    error = AudioqError(FailureCode.CORRUPT_AUDIO, "the file is truncated")
    assert classify(error) is error


@pytest.mark.parametrize("exc,code", [
    (JobTimeoutException("Task exceeded maximum timeout value (61 seconds)"), FailureCode.TIMEOUT),
    (DeserializationError(), FailureCode.INVALID_REQUEST),
    (MemoryError(), FailureCode.MODEL_ERROR),
    (ValueError("shapes (3,) and (4,) do not broadcast"), FailureCode.MODEL_ERROR),
])
def test_other_exceptions_get_a_code(exc, code):
    assert classify(exc).code == code


def test_unexpected_exceptions_keep_a_short_one_line_message():
    error = classify(RuntimeError("line one\nline two " + "x" * 1000))
    assert error.message.startswith("RuntimeError: line one line two")
    assert len(error.message) <= len("RuntimeError: ") + MAX_MESSAGE


def test_failure_records_carry_retryability_attempt_and_worker():
    failure = failure_for(AudioqError(FailureCode.STORAGE_UNAVAILABLE, "down"), attempt=0, worker="mac-1")
    assert failure.retryable and failure.attempt == 1 and failure.worker == "mac-1"
    assert not failure_for(KeyError("k"), attempt=2, worker=None).retryable
