"""``audioq transcribe``: run the engine on local files, no queue involved.

The model loads once; each file goes down the worker's own path (``worker.recording``):
decoded to 16 kHz mono, cut into chunks at pauses, one model turn per chunk (and, for a
question about long audio, one over the transcript), under the same limits as the worker.
A file that fails prints a clear error (to stderr, or as a JSON line with ``--json``) and
the others still run; the exit status is 1 when any file failed, 3 when the model could
not be loaded. ``--json`` writes JSON Lines: one result object per file; ``--format``
renders each result with ``producer.writers`` instead (to stdout, or ``--output-dir``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, JobResult, OutputFormat
from producer.settings import Settings
from producer.writers import get_writer
from worker.audio import decode_audio
from worker.gemma4.engine import Engine
from worker.recording import Recording, answer_tokens, plan_recording, run_alone

CANNOT_RUN = 3  # the CLI's exit status for "the command could not run"
WORKER = "audioq transcribe"  # the result's ``worker``


def _read(file: str, max_seconds: float):
    try:
        return decode_audio(file, max_seconds=max_seconds)
    except OSError as exc:  # missing file, a directory, no permission
        raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"cannot read {file}: {exc.strerror or exc}") from None


def transcribe_file(engine: Engine, file: str, request: JobRequest, budget: int,
                    settings: Settings) -> tuple[JobResult, list[int]]:
    """One file's result, and the token ids generated for it (chunk by chunk, then any answer turn)."""
    samples = _read(file, settings.max_audio_seconds)
    recording = Recording(samples, plan_recording(samples, settings), request, budget,
                          count_tokens=answer_tokens(engine), answer_context_tokens=settings.answer_context_tokens)
    run_alone(engine, recording)
    return JobResult(**recording.result_fields(), model=engine.model_id, worker=WORKER), recording.token_ids()


def run_transcribe(files: list[str], *, model: str | None, request_fields: dict | None = None,
                   max_new_tokens: int | None = None, as_json: bool = False,
                   output_format: OutputFormat | None = None, output_dir: str | None = None,
                   settings: Settings | None = None, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:
    settings = settings or Settings()
    out, err = out or sys.stdout, err or sys.stderr
    model = model or settings.model
    if not model:
        print("audioq transcribe: no model given (--model DIR_OR_REPO or AUDIOQ_MODEL)", file=err)
        return CANNOT_RUN
    budget = max_new_tokens or settings.default_max_new_tokens
    if budget > settings.max_new_tokens_limit:
        print(f"audioq transcribe: --max-new-tokens {budget} is above max_new_tokens_limit "
              f"({settings.max_new_tokens_limit})", file=err)
        return CANNOT_RUN
    requests = [JobRequest(audio_uri=Path(file).absolute().as_uri(), **(request_fields or {})) for file in files]
    try:
        engine = Engine.load(model)
    except AudioqError as exc:
        print(f"audioq transcribe: cannot load model: {exc.message}", file=err)
        return CANNOT_RUN
    failed = 0
    for file, request in zip(files, requests):
        started = time.perf_counter()
        try:
            result, token_ids = transcribe_file(engine, file, request, budget, settings)
        except AudioqError as exc:
            failed += 1
            if as_json:
                print(json.dumps({"file": file, "error": exc.code.value, "message": exc.message}), file=out)
            else:
                print(f"{file}: {exc.code.value}: {exc.message}", file=err)
            continue
        if as_json:
            line = {"file": file, **result.model_dump(mode="json"), "token_ids": token_ids,
                    "seconds": round(time.perf_counter() - started, 4)}
            print(json.dumps(line), file=out)
        elif output_dir:
            writer = get_writer(output_format or "txt")
            path = Path(output_dir) / f"{Path(file).stem}.{writer.extension}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(writer.render(result), encoding="utf-8")
            print(path, file=out)
        elif output_format:
            if len(files) > 1:
                print(f"== {file} ==", file=out)
            out.write(get_writer(output_format).render(result))
        else:
            print(result.text if len(files) == 1 else f"{file}\t{result.text}", file=out)
        out.flush()
    return 1 if failed else 0
