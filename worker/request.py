"""The worker's check of a job's request, before it downloads anything.

A record in Redis may come from anywhere, so the worker validates the request again with
the producer's own model (``JobRequest``) and limits (``JobRequest.limit_problems``), then
counts the tokens of the instruction the model will read (``max_prompt_tokens``), which
only the worker can do: it needs the model's tokenizer. Character limits are checked
first, so an oversized prompt is refused without being tokenized.
"""

from __future__ import annotations

from pydantic import ValidationError

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest
from producer.settings import Settings
from worker.gemma4.prompt import PromptBuilder
from worker.instructions import instruction_for


def _refused(problems: str) -> AudioqError:
    return AudioqError(FailureCode.INVALID_REQUEST, f"invalid job request: {problems}")


def parse_request(raw: object, settings: Settings, prompts: PromptBuilder) -> JobRequest:
    """The validated request, or ``invalid_request`` naming every problem found."""
    try:
        request = JobRequest.model_validate(raw)
    except ValidationError as exc:
        raise _refused("; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                                 for e in exc.errors())) from None
    problems = request.limit_problems(settings)
    if problems:
        raise _refused("; ".join(problems))
    tokens = prompts.instruction_tokens(instruction_for(request))
    if tokens > settings.max_prompt_tokens:
        raise _refused(f"the instruction is {tokens} tokens; this worker accepts at most "
                       f"{settings.max_prompt_tokens} (max_prompt_tokens)")
    return request
