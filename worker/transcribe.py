"""``audioq transcribe``: run the engine on local files, no queue involved.

The model loads once; each file is decoded, resampled to 16 kHz mono, and run on its own,
under the same limits as the worker (``max_audio_seconds``, ``max_new_tokens_limit``).
A file that fails prints a clear error (to stderr, or as a JSON line with ``--json``) and
the others still run; the exit status is 1 when any file failed, 3 when the model could
not be loaded. ``--json`` writes JSON Lines: one object per file.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from producer.failures import AudioqError, FailureCode
from producer.settings import Settings
from worker.audio import decode_audio
from worker.gemma4.engine import ClipRequest, Engine
from worker.instructions import TRANSCRIBE

CANNOT_RUN = 3  # the CLI's exit status for "the command could not run"


def _read(file: str, max_seconds: float):
    try:
        return decode_audio(file, max_seconds=max_seconds)
    except OSError as exc:  # missing file, a directory, no permission
        raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"cannot read {file}: {exc.strerror or exc}") from None


def run_transcribe(files: list[str], *, model: str | None, prompt: str | None = None,
                   max_new_tokens: int | None = None, as_json: bool = False,
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
    try:
        engine = Engine.load(model)
    except AudioqError as exc:
        print(f"audioq transcribe: cannot load model: {exc.message}", file=err)
        return CANNOT_RUN
    max_seconds = min(settings.max_audio_seconds, engine.max_clip_seconds)
    failed = 0
    for file in files:
        started = time.perf_counter()
        try:
            samples = _read(file, max_seconds)
            (output,) = engine.run([ClipRequest(samples, prompt or TRANSCRIBE, budget)])
        except AudioqError as exc:
            failed += 1
            if as_json:
                print(json.dumps({"file": file, "error": exc.code.value, "message": exc.message}), file=out)
            else:
                print(f"{file}: {exc.code.value}: {exc.message}", file=err)
            continue
        seconds = time.perf_counter() - started
        if as_json:
            print(json.dumps({"file": file, "text": output.text, "tokens": output.tokens,
                              "audio_tokens": output.audio_tokens, "seconds": round(seconds, 4),
                              "audio_seconds": round(samples.size / engine.sample_rate, 3),
                              "timings": {k: round(v, 4) for k, v in output.timings.items()}}),
                  file=out)
        else:
            print(output.text if len(files) == 1 else f"{file}\t{output.text}", file=out)
        out.flush()
    return 1 if failed else 0
