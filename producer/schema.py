"""The job contract shared by producers and workers (pydantic v2).

A request is validated by the producer before it is enqueued and again by the worker
before it runs, so a job written to Redis by other means cannot smuggle in bad fields.
Results and failures are what the worker writes back to the job record.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from producer.failures import FailureCode
from producer.s3 import split_s3_uri

if TYPE_CHECKING:
    from producer.settings import Settings

AUDIO_SCHEMES = ("s3", "file")
# What a worker can write to output_uri (producer/writers.py renders each); the default pair
# is what workers wrote before formats were selectable.
OutputFormat = Literal["txt", "json", "srt", "vtt"]
DEFAULT_OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("json", "txt")
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"


def _not_a_boolean(value: Any) -> Any:
    """JSON's true is not 1: pydantic's lax ints would take it (``max_new_tokens: true`` ran as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true or false")
    return value


WholeNumber = Annotated[int, BeforeValidator(_not_a_boolean)]

# Request text fields with a length limit, and the setting that holds it.
TEXT_LIMITS = {"prompt": "max_prompt_chars", "language": "max_language_chars",
               "target_language": "max_language_chars"}


def _check_uri(uri: str, what: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        try:
            split_s3_uri(uri)
        except ValueError:
            raise ValueError(f"{what} {uri!r}: s3 URIs need a bucket name (s3://bucket/key)") from None
    elif parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"{what} {uri!r}: file URIs need an absolute path (file:///abs/path)")
        if "\0" in unquote(parsed.path):
            raise ValueError(f"{what} {uri!r}: names a path with a NUL byte, which no file has")
    else:
        raise ValueError(f"{what} {uri!r}: scheme must be one of {', '.join(AUDIO_SCHEMES)}")
    return uri


class JobRequest(BaseModel):
    """What to do with one audio object."""

    model_config = ConfigDict(extra="forbid")

    audio_uri: str = Field(description="s3://bucket/key, or file:///abs/path for local use")
    task: Literal["transcribe", "translate", "prompt"] = "transcribe"
    target_language: str | None = Field(None, description="required for task=translate")
    prompt: str | None = Field(None, description="the instruction, required for task=prompt")
    language: str | None = Field(None, description="hint: the language spoken in the audio")
    max_new_tokens: WholeNumber | None = Field(None, ge=1, description="None: the worker's default")
    output_uri: str | None = Field(None, description="prefix to write <job_id>.<format> under")
    output_formats: list[OutputFormat] = Field(default_factory=lambda: list(DEFAULT_OUTPUT_FORMATS),
                                               min_length=1, description="what to write to output_uri")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form, echoed back")

    @field_validator("audio_uri")
    @classmethod
    def _audio_uri(cls, v: str) -> str:
        _check_uri(v, "audio_uri")
        if urlparse(v).scheme == "s3" and not split_s3_uri(v)[1].strip("/"):
            raise ValueError(f"audio_uri {v!r}: names a bucket but no object key")
        return v

    @field_validator("output_uri")
    @classmethod
    def _output_uri(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v, "output_uri")

    @field_validator("output_formats", mode="before")
    @classmethod
    def _formats_from_text(cls, v: Any) -> Any:
        """A CSV manifest cell (or a flag value) holds the list as text: ``srt,vtt`` or ``srt vtt``."""
        return v.replace(",", " ").split() if isinstance(v, str) else v

    @field_validator("output_formats")
    @classmethod
    def _distinct_formats(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))  # each file once, in the order first asked

    @field_validator("prompt", "target_language", "language")
    @classmethod
    def _non_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @model_validator(mode="after")
    def _task_fields(self) -> "JobRequest":
        if self.task == "translate" and not self.target_language:
            raise ValueError("task 'translate' needs target_language")
        if self.task == "prompt" and not self.prompt:
            raise ValueError("task 'prompt' needs prompt")
        if self.task != "prompt" and self.prompt:
            raise ValueError(f"prompt is only for task 'prompt', not {self.task!r}")
        return self

    def limit_problems(self, settings: "Settings") -> list[str]:
        """What in this request is longer than the settings allow (``TEXT_LIMITS``, and the whole
        request's size, which bounds the metadata and URIs too); empty when nothing is.

        The producer checks this before enqueueing and the worker again before it downloads
        anything, since a record may come from elsewhere. (The prompt's token count needs the
        tokenizer, so only the worker checks that: ``max_prompt_tokens``.)
        """
        problems = []
        for name, setting in TEXT_LIMITS.items():
            value, limit = getattr(self, name), getattr(settings, setting)
            if value is not None and len(value) > limit:
                problems.append(f"{name} is {len(value)} characters; at most {limit} are allowed ({setting})")
        size = len(json.dumps(self.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")).encode())
        if size > settings.max_request_bytes and not problems:  # else a field over its own limit says why
            problems.append(f"the request is {size} bytes as JSON, metadata included; at most "
                            f"{settings.max_request_bytes} are allowed (max_request_bytes)")
        return problems

    def derived_job_id(self) -> str:
        """A stable id from everything that shapes the output (metadata excluded).

        Re-enqueueing the same request therefore names the same job, which RQ's ``unique``
        enqueue refuses to create twice.
        """
        key = self.model_dump(mode="json", exclude={"metadata"})
        if tuple(self.output_formats) == DEFAULT_OUTPUT_FORMATS:
            del key["output_formats"]  # requests from before the field existed keep their ids
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return f"aq-{digest[:32]}"


class Segment(BaseModel):
    """One chunk of the recording: seconds from the start of the original audio (3 decimals)."""

    start: float
    end: float
    text: str
    transcript: str | None = Field(None, description="task=translate: what was said, in its own language")


class JobResult(BaseModel):
    """A finished job's output."""

    text: str = Field(description="the segments' texts joined; task=prompt: the answer")
    segments: list[Segment]
    transcript: str | None = Field(None, description="task=translate: the segments' transcripts joined")
    model: str
    audio_seconds: float
    # Defaults read results written before long audio, when every job was one clip.
    chunks: int = Field(1, ge=0, description="chunks of the recording sent to the model (silence is skipped)")
    speech_seconds: float | None = Field(None, description="seconds of audio inside those chunks")
    resumed_chunks: int = Field(0, ge=0, description="chunks taken from an earlier attempt's record, not rerun")
    timings: dict[str, float] = Field(description="seconds per stage: fetch, decode_audio, front_end, ...")
    worker: str
    tokens: WholeNumber = Field(description="generated tokens, stop token excluded")
    audio_tokens: WholeNumber = Field(description="audio soft tokens fed to the decoder")
    output_uris: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobFailure(BaseModel):
    """Why a job did not produce a result."""

    code: FailureCode
    message: str
    retryable: bool
    attempt: WholeNumber = Field(ge=1)
    worker: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class Progress(BaseModel):
    """Where a running job is: its stage, and once the audio is planned, which chunk of how many.

    ``chunks_done`` and ``audio_seconds_done`` (the recording is finished up to there) only
    grow; ``chunk`` is the chunk the stage belongs to. The answer turn of a long ``prompt``
    task runs after every chunk, with ``chunk`` None.
    """

    stage: Literal[
        "claimed", "fetch", "decode_audio", "front_end", "audio_tower", "prefill", "generate", "write"
    ]
    chunk: WholeNumber | None = Field(None, ge=1)
    chunks: WholeNumber | None = Field(None, ge=0)
    chunks_done: WholeNumber | None = Field(None, ge=0)
    audio_seconds_done: float | None = None
    audio_seconds: float | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
