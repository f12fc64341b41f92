"""Stable failure codes and the one exception type that carries them.

Every way a job can fail maps to exactly one ``FailureCode``. The code is what scripts
branch on; the message is the sentence a person reads. Both travel on the job record.
"""

from __future__ import annotations

from enum import Enum


class FailureCode(str, Enum):
    AUDIO_NOT_FOUND = "audio_not_found"
    ACCESS_DENIED = "access_denied"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_AUDIO = "corrupt_audio"
    EMPTY_AUDIO = "empty_audio"
    AUDIO_TOO_LARGE = "audio_too_large"
    AUDIO_TOO_LONG = "audio_too_long"
    INVALID_REQUEST = "invalid_request"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    CANCELED = "canceled"


# Codes worth another attempt: the same request may succeed later.
RETRYABLE = frozenset({FailureCode.STORAGE_UNAVAILABLE, FailureCode.WORKER_LOST})


class AudioqError(Exception):
    """A failure with a stable code and an actionable message."""

    def __init__(self, code: FailureCode | str, message: str):
        super().__init__(message)
        self.code = FailureCode(code)
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
