"""``audioq transcribe``: run the engine on local files, no queue involved.

The model loads once; each file goes down the worker's own path (``worker.recording``):
decoded to 16 kHz mono, cut into chunks at pauses, one model turn per chunk (and, for a
question about long audio, one over the transcript), under the same limits as the worker.
The files' clips run batched in one engine stream, up to ``batch_max_jobs`` files open at
once; results come out in the order the files were given.
A file that fails prints a clear error (to stderr, or as a JSON line with ``--json``) and
the others still run; the exit status is 1 when any file failed, 3 when the model could
not be loaded. ``--json`` writes JSON Lines: one result object per file; ``--format``
renders each result with ``producer.writers`` instead (to stdout, or ``--output-dir``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from producer.failures import AudioqError, FailureCode
from producer.schema import JobRequest, JobResult, OutputFormat
from producer.settings import Settings
from producer.writers import get_writer
from worker.audio import decode_audio
from worker.failures import classify
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine
from worker.process import engine_options
from worker.recording import Recording, answer_tokens, plan_recording

CANNOT_RUN = 3  # the CLI's exit status for "the command could not run"
WORKER = "audioq transcribe"  # the result's ``worker``


def _read(file: str, max_seconds: float):
    try:
        return decode_audio(file, max_seconds=max_seconds)
    except OSError as exc:  # missing file, a directory, no permission
        raise AudioqError(FailureCode.AUDIO_NOT_FOUND, f"cannot read {file}: {exc.strerror or exc}") from None


@dataclass(eq=False)
class _File:
    index: int
    name: str
    request: JobRequest
    started: float = 0.0
    recording: Recording | None = None  # while it runs; dropped once it settles
    outcome: JobResult | AudioqError | None = None
    in_engine: int = 0
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, stage: str) -> None:
        """Its clips' stage hook: once the file has failed, its other clips leave the engine."""
        if self.outcome is not None:
            raise AudioqError(FailureCode.MODEL_ERROR, f"{self.name} has already failed")


Emit = Callable[[str, "JobResult | AudioqError", list[int], float], None]


def transcribe_files(engine: Engine, files: list[str], requests: list[JobRequest], budget: int,
                     settings: Settings, emit: Emit) -> None:
    """Every file down the worker's path, their clips batched in one engine stream.

    At most ``batch_max_jobs`` files are decoded and open at once. ``emit(file, result or
    error, token ids, seconds)`` is called in the order of ``files``, as soon as a file and
    every file before it are done; a file that fails does not stop the others.
    """
    queued = deque(_File(i, f, r) for i, (f, r) in enumerate(zip(files, requests)))
    open_files: list[_File] = []
    waiting: deque[tuple[_File, ClipRequest]] = deque()
    owner: dict[int, _File] = {}
    finished: dict[int, _File] = {}
    next_emit = 0

    def settle(file: _File, outcome: JobResult | AudioqError) -> None:
        nonlocal next_emit
        file.outcome = file.outcome or outcome
        if file.in_engine:
            return  # its other clips are still in the engine
        if file in open_files:
            open_files.remove(file)
        if isinstance(file.outcome, JobResult):
            file.tokens = file.recording.token_ids()
        file.recording, file.seconds = None, time.perf_counter() - file.started
        finished[file.index] = file
        while next_emit in finished:
            done = finished.pop(next_emit)
            emit(done.name, done.outcome, done.tokens, done.seconds)
            next_emit += 1

    def open_more() -> None:
        while queued and len(open_files) < settings.batch_max_jobs:
            file = queued.popleft()
            file.started = time.perf_counter()
            try:
                samples = _read(file.name, settings.max_audio_seconds)
                file.recording = Recording(samples, plan_recording(samples, settings), file.request, budget,
                                           count_tokens=answer_tokens(engine),
                                           answer_context_tokens=settings.answer_context_tokens,
                                           on_stage=lambda chunk, file=file: file.check)
            except AudioqError as exc:
                settle(file, exc)
                continue
            open_files.append(file)

    def feed(free: int) -> list[ClipRequest]:
        open_more()
        for file in list(open_files):
            if file.outcome is not None:
                continue
            try:
                waiting.extend((file, clip) for clip in file.recording.clips())
            except AudioqError as exc:  # its answer turn over budget
                settle(file, exc)
                continue
            if file.recording.complete and not file.in_engine:  # nothing to run (all silence)
                settle(file, result_of(file))
        taken = []
        while waiting and len(taken) < free:
            file, clip = waiting.popleft()
            if file.outcome is None:
                owner[id(clip)] = file
                file.in_engine += 1
                taken.append(clip)
        return taken

    def on_done(clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        file = owner.pop(id(clip))
        file.in_engine -= 1
        if isinstance(outcome, Exception):  # the model's error ends this file alone
            settle(file, classify(outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
        elif file.outcome is None:
            file.recording.clip_done(clip, outcome)
            if file.recording.complete:
                settle(file, result_of(file))
        elif not file.in_engine:
            settle(file, file.outcome)

    def result_of(file: _File) -> JobResult:
        return JobResult(**file.recording.result_fields(), model=engine.model_id, worker=WORKER)

    while next_emit < len(files):
        engine.stream(feed, on_done)


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
    if output_dir:  # DIR/<stem>.<ext> per file: two files of one stem would overwrite each other
        clashes = sorted(stem for stem, n in Counter(Path(f).stem for f in files).items() if n > 1)
        if clashes:
            print(f"audioq transcribe: with --output-dir, files of the same name would overwrite each other's "
                  f"output ({', '.join(clashes[:5])}): run them apart or rename them", file=err)
            return CANNOT_RUN
    requests = [JobRequest(audio_uri=Path(file).absolute().as_uri(), **(request_fields or {})) for file in files]
    try:
        engine = Engine.load(model, **engine_options(settings))
    except AudioqError as exc:
        print(f"audioq transcribe: cannot load model: {exc.message}", file=err)
        return CANNOT_RUN
    failed = 0

    def emit(file: str, result: JobResult | AudioqError, token_ids: list[int], seconds: float) -> None:
        nonlocal failed
        if isinstance(result, AudioqError):
            failed += 1
            if as_json:
                print(json.dumps({"file": file, "error": result.code.value, "message": result.message}), file=out)
            else:
                print(f"{file}: {result.code.value}: {result.message}", file=err)
            return
        if as_json:
            line = {"file": file, **result.model_dump(mode="json"), "token_ids": token_ids,
                    "seconds": round(seconds, 4)}
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

    transcribe_files(engine, files, requests, budget, settings, emit)
    return 1 if failed else 0
