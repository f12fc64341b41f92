"""``audioq``: enqueue audio jobs, watch them, read their results, run the worker.

    audioq [--config FILE] [--redis-url URL] COMMAND [--json] ...

    enqueue URI | --manifest FILE | --prefix s3://bucket/prefix/ [--all]
            [--task T] [--target-language L] [--prompt P] [--language L]
            [--max-new-tokens N] [--output-uri URI] [--output-format F ...] [--metadata KEY=VALUE ...]
            [--job-id ID] [--priority high|default|low]
    status ID...            wait ID... [--timeout S] [--poll S]
    results ID... [--format txt|json|srt|vtt]
    list [--state S] [--queue Q] [--limit N] [--offset N]
    cancel ID...            requeue ID... | --all-failed [--queue Q]
    info
    worker --model DIR_OR_REPO [--queue Q ...] [--burst] [--max-jobs N] [--name NAME]
    transcribe AUDIO... --model DIR [--task T] [--language L] [--target-language L] [--prompt TEXT]
            [--max-new-tokens N] [--format txt|json|srt|vtt] [--output-dir DIR]

``--config`` and ``--redis-url`` may come before or after the command. With ``--json``
every command writes exactly one JSON document to stdout. Commands that take job ids or
make jobs (enqueue, status, wait, results, list, cancel, requeue) always write a JSON
*list*, one element per job in the order given, even for a single id, so scripts parse
one shape. ``info`` writes an object.

Exit codes, the same for every command:

- 0: success.
- 1: a job named on the command line failed, was canceled, is unknown or its record is
  unreadable (``status``, ``wait``, ``results``; ``results`` also when a job has no
  result yet), or is unknown
  (``cancel``, ``requeue``). ``transcribe``: a file could not be transcribed.
- 2: ``wait`` timed out, or the command line was wrong (argparse's own errors and
  combinations of options that do not go together).
- 3: the command could not run: invalid request or manifest, Redis or storage
  unreachable, bad settings, or (``worker``, ``transcribe``) no model or one that
  cannot be loaded. ``_callee_code`` maps what ``run_worker``/``run_transcribe`` return
  onto these codes.

Errors are one line on stderr, never a traceback (set ``AUDIOQ_DEBUG=1`` to get one).
Text read from Redis (ids, URIs, messages, names) is printed through ``printable``, so a
crafted record cannot forge lines or send escape codes to the terminal; ``--json`` output
is JSON-escaped by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import ValidationError

from producer.failures import AudioqError
from producer.manifest import PRIORITIES, ManifestError, describe_validation_error
from producer.printable import printable
from producer.progress_bar import ProgressLine
from producer.s3 import StorageError
from producer.schema import OutputFormat
from producer.settings import Settings, load_settings
from producer.writers import WRITERS, get_writer

EXIT_OK, EXIT_JOB_FAILED, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3
EXIT_USAGE = EXIT_TIMEOUT  # 2: argparse's own code for a wrong command line


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 3."""


class UsageError(CommandError):
    """Options that do not go together: printed as one line, exit code 2 like argparse's errors."""


# ------------------------------------------------------------------ output helpers
def _emit_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _say(message: str) -> None:
    print(f"audioq: {message}", file=sys.stderr)


def _progress(total: int, label: str) -> ProgressLine | None:
    return ProgressLine(sys.stderr, total, label) if sys.stderr.isatty() else None


def _detail(status) -> str:
    if status.state == "unreadable":
        return status.reason or ""
    again = f" (again, after {status.retry.code.value})" if status.retry else ""
    if status.state == "queued":
        return (f"position {status.position}" if status.position is not None else "") + again
    if status.state == "scheduled":
        return again.strip(" ()")
    if status.state == "started" and status.progress:
        p = status.progress
        chunk = f" chunk {p.chunk}/{p.chunks}" if p.chunk is not None and p.chunks else ""
        if p.audio_seconds_done is not None and p.audio_seconds:
            chunk += f", {p.audio_seconds_done:.0f}/{p.audio_seconds:.0f} s done"
        return f"{p.stage}{chunk}"
    if status.result is not None:
        text = " ".join(status.result.text.split())
        return text if len(text) <= 70 else text[:67] + "..."
    if status.failure is not None:
        return f"{status.failure.code.value}: {status.failure.message}"
    return ""


def _print_statuses(statuses, as_json: bool) -> None:
    if as_json:
        _emit_json([s.model_dump(mode="json") for s in statuses])
        return
    for s in statuses:
        print("  ".join(printable(part) for part in (s.id, s.state, s.queue or "-", _detail(s)) if part))


def _unknown(statuses) -> int:
    missing = [s.id for s in statuses if s.state == "not_found"]
    for job_id in missing:
        _say(f"unknown job {job_id}")
    return EXIT_JOB_FAILED if missing else EXIT_OK


def _any_failed(statuses) -> bool:
    """Whether a job failed, was canceled, is unknown or unreadable (exit code 1)."""
    return any(s.state in ("failed", "canceled", "not_found", "unreadable") for s in statuses)


# ---------------------------------------------------------------------- commands
def _client(settings: Settings):
    from producer.client import Client

    return Client(settings)


def _request_fields(args) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("task", "target_language", "prompt", "language", "max_new_tokens", "output_uri",
                 "output_formats"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "metadata", None):
        metadata = {}
        for pair in args.metadata:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"--metadata {pair!r}: expected KEY=VALUE")
            metadata[key] = value
        fields["metadata"] = metadata
    return fields


def cmd_enqueue(args, settings: Settings) -> int:
    modes = [m for m in (args.uri, args.manifest, args.prefix) if m]
    if len(modes) != 1:
        raise UsageError("give exactly one of: an audio URI, --manifest FILE, --prefix s3://bucket/prefix/")
    fields = _request_fields(args)
    if args.job_id and not args.uri:
        raise UsageError("--job-id only goes with a single audio URI")
    if args.all and not args.prefix:
        raise UsageError("--all only goes with --prefix")
    if args.manifest and fields:
        raise UsageError("request flags do not apply to --manifest: put the fields in its rows")
    client = _client(settings)
    bar: ProgressLine | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress(total, "enqueue")
        if bar is not None:
            bar.update(done)

    try:
        if args.uri:
            outcomes = [client.enqueue({**fields, "audio_uri": args.uri}, job_id=args.job_id,
                                       priority=args.priority)]
        elif args.manifest:
            outcomes = client.enqueue_manifest(args.manifest, priority=args.priority, on_progress=on_progress)
        else:
            outcomes = client.enqueue_prefix(args.prefix, all_objects=args.all, priority=args.priority,
                                             on_progress=on_progress, **fields)
            if not outcomes:
                raise CommandError(f"no {'' if args.all else 'audio '}objects under {args.prefix}")
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _emit_json([{**o.model_dump(mode="json"), "outcome": o.outcome} for o in outcomes])
    else:
        for o in outcomes:
            print(o.job_id)
    existed = sum(not o.created for o in outcomes)
    if len(outcomes) > 1 or existed:
        _say(f"{len(outcomes) - existed} enqueued, {existed} already existed")
    return EXIT_OK


def cmd_status(args, settings: Settings) -> int:
    statuses = _client(settings).status_many(args.ids)
    _print_statuses(statuses, args.json)
    _unknown(statuses)
    return EXIT_JOB_FAILED if _any_failed(statuses) else EXIT_OK


def cmd_wait(args, settings: Settings) -> int:
    from producer.client import WaitTimeout
    bar = _progress(len(set(args.ids)), "wait")
    known: dict[str, str] = {}
    steps: dict[str, tuple[int, int]] = {}  # job id -> (steps done, steps): its chunks once known, else 1

    def on_update(status) -> None:
        known[status.id] = status.state
        if bar is not None:
            steps[status.id] = _steps(status, steps.get(status.id, (0, 1)))
            counts = {state: list(known.values()).count(state) for state in ("started", "failed", "canceled")}
            note = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
            bar.total = sum(total for _, total in steps.values()) + len(set(args.ids)) - len(steps)
            bar.update(sum(done for done, _ in steps.values()), note)

    timed_out = False
    try:
        statuses = _client(settings).wait(args.ids, timeout=args.timeout, poll=args.poll, on_update=on_update)
    except WaitTimeout as exc:
        statuses, timed_out = exc.statuses, True
    finally:
        if bar is not None:
            bar.close()
    _print_statuses(statuses, args.json)
    if timed_out:
        _say(f"timed out after {args.timeout:g} s: {sum(not s.terminal for s in statuses)} job(s) not done")
        return EXIT_TIMEOUT
    _unknown(statuses)
    return EXIT_OK if all(s.state == "finished" for s in statuses) else EXIT_JOB_FAILED


def _steps(status, before: tuple[int, int]) -> tuple[int, int]:
    """How far one job is, for ``wait``'s bar: a running job counts its chunks, a done one is full."""
    _, total = before
    progress = status.progress
    if progress is not None and progress.chunks:
        total = progress.chunks
    if status.terminal:
        return total, total
    return (progress.chunks_done or 0) if progress is not None and progress.chunks else 0, total


def cmd_results(args, settings: Settings) -> int:
    statuses = _client(settings).status_many(args.ids)
    if args.json or args.format == "json":
        _emit_json([{"id": s.id, "state": s.state,
                     "result": s.result.model_dump(mode="json") if s.result else None,
                     "failure": s.failure.model_dump(mode="json") if s.failure else None,
                     **({"reason": s.reason} if s.reason else {})} for s in statuses])
    else:
        for s in statuses:
            if s.result is not None:
                if len(statuses) > 1:
                    print(f"== {s.id} ==")
                # a transcript's or subtitle's own lines stay lines; nothing else from Redis reaches the terminal raw
                sys.stdout.write(printable(get_writer(args.format).render(s.result), keep="\n\t"))
            elif s.failure is not None:
                _say(printable(f"{s.id}: {s.state}: {s.failure.code.value}: {s.failure.message}"))
            elif s.state == "unreadable":
                _say(printable(f"{s.id}: unreadable: {s.reason}"))
            elif s.state == "not_found":
                _say(f"unknown job {s.id}")
            else:
                _say(f"{s.id}: not done yet ({s.state})")
    return EXIT_OK if all(s.state == "finished" for s in statuses) else EXIT_JOB_FAILED


def cmd_list(args, settings: Settings) -> int:
    statuses = _client(settings).list(args.state, queue=args.queue, limit=args.limit, offset=args.offset)
    if args.json:
        _emit_json([s.model_dump(mode="json") for s in statuses])
    else:
        for s in statuses:
            what = s.reason if s.state == "unreadable" else s.request.audio_uri if s.request else "-"
            print("  ".join(printable(part) for part in (s.id, s.state, s.queue or "-", what)))
    return EXIT_OK


def _print_actions(outcomes, as_json: bool) -> int:
    if as_json:
        _emit_json([o.model_dump(mode="json") for o in outcomes])
    else:
        for o in outcomes:
            print(printable(f"{o.job_id}  {o.action}  {o.message}"))
    return EXIT_JOB_FAILED if any(o.action == "not_found" for o in outcomes) else EXIT_OK


def cmd_cancel(args, settings: Settings) -> int:
    client = _client(settings)
    return _print_actions([client.cancel(job_id) for job_id in args.ids], args.json)


def cmd_requeue(args, settings: Settings) -> int:
    if bool(args.ids) == args.all_failed:
        raise UsageError("give job ids or --all-failed")
    if args.queue and not args.all_failed:
        raise UsageError("--queue only goes with --all-failed")
    client = _client(settings)
    outcomes = client.requeue(args.ids or None, all_failed=args.all_failed, queue=args.queue)
    return _print_actions(outcomes, args.json)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_info(args, settings: Settings) -> int:
    info = _client(settings).info()
    if args.json:
        _emit_json(info.model_dump(mode="json"))
        return EXIT_OK
    columns = ("queued", "started", "finished", "failed", "canceled", "scheduled", "deferred")
    width = max([len("queue"), *(len(printable(q.name)) for q in info.queues)])
    print(f"{'queue':<{width}}  " + "  ".join(f"{c:>9}" for c in columns) + "  oldest")
    for q in info.queues:
        counts = "  ".join(f"{getattr(q, c):>9}" for c in columns)
        print(f"{printable(q.name):<{width}}  {counts}  {_age(q.oldest_queued_seconds)}")
    print(f"{len(info.workers)} worker(s)")
    for w in info.workers:
        beat = w.last_heartbeat.isoformat(timespec="seconds") if w.last_heartbeat else "-"
        print(printable(f"  {w.name}  {w.state}  job={w.current_job or '-'}  heartbeat={beat}  "
                        f"queues={','.join(w.queues)}"))
    return EXIT_OK


def _worker_settings(args, settings: Settings) -> Settings:
    """``--model`` wins; without it the config file's or AUDIOQ_MODEL's model stays."""
    return settings.model_copy(update={"model": args.model}) if args.model else settings


def _import_worker(module: str, name: str) -> Callable:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise CommandError(f"cannot load the worker ({exc}); it needs: pip install 'audioq[worker]'") from None


def _callee_code(rc: int | None) -> int:
    """The CLI's exit code for what ``run_worker``/``run_transcribe`` returned.

    They return 0 (done), 1 (``transcribe``: a file failed), or "could not run" (no model,
    or it cannot be loaded): 3 from ``run_transcribe`` (its ``CANNOT_RUN``), 2 from
    ``run_worker`` so far. Both become 3 here, where 2 means a wrong command line or a
    ``wait`` timeout; anything else unexpected is 3 as well.
    """
    if rc is None:
        return EXIT_OK
    return rc if rc in (EXIT_OK, EXIT_JOB_FAILED) else EXIT_ERROR


def cmd_worker(args, settings: Settings) -> int:
    run_worker = _import_worker("worker.process", "run_worker")
    return _callee_code(run_worker(_worker_settings(args, settings), queues=args.queue or list(settings.queues),
                                   burst=args.burst, max_jobs=args.max_jobs, name=args.name))


def cmd_transcribe(args, settings: Settings) -> int:
    run_transcribe = _import_worker("worker.transcribe", "run_transcribe")
    if args.output_dir and args.json:
        raise UsageError("--output-dir writes files; --json writes JSON Lines to stdout: give one of them")
    fields = _request_fields(args)
    if args.prompt and not args.task:
        fields["task"] = "prompt"
    return _callee_code(run_transcribe(args.files, model=args.model, request_fields=fields,
                                       max_new_tokens=args.max_new_tokens, as_json=args.json,
                                       output_format=args.format, output_dir=args.output_dir,
                                       settings=_worker_settings(args, settings)))


# ------------------------------------------------------------------------ parser
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text}")
    return value


FORMATS = tuple(WRITERS)


def _format(text: str) -> OutputFormat:
    return "txt" if text == "text" else text  # "text" was the name before subtitles


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioq", description="Queue-backed audio jobs for Gemma 4 on MLX.")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (default: $AUDIOQ_CONFIG)")
    parser.add_argument("--redis-url", metavar="URL", help="overrides redis_url from config/environment")
    parser.set_defaults(json=False)
    # The same global flags after the command; SUPPRESS keeps the ones given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS)
    common.add_argument("--redis-url", metavar="URL", default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="one JSON document on stdout")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("enqueue", cmd_enqueue, "enqueue one URI, a manifest, or every audio object under an S3 prefix")
    p.add_argument("uri", nargs="?", help="s3://bucket/key or file:///abs/path")
    p.add_argument("--manifest", metavar="FILE", help="JSONL or CSV, one request per row")
    p.add_argument("--prefix", metavar="S3_URI", help="s3://bucket/prefix/: one job per audio object")
    p.add_argument("--all", action="store_true", help="with --prefix: every object, not only audio extensions")
    p.add_argument("--task", choices=("transcribe", "translate", "prompt"))
    p.add_argument("--target-language")
    p.add_argument("--prompt")
    p.add_argument("--language")
    p.add_argument("--max-new-tokens", type=_positive_int)
    p.add_argument("--output-uri")
    p.add_argument("--output-format", dest="output_formats", action="append", choices=FORMATS,
                   help="repeatable: what the worker writes to --output-uri (default: json and txt)")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--job-id")
    p.add_argument("--priority", choices=PRIORITIES)

    p = command("status", cmd_status, "show the status of jobs")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command("wait", cmd_wait, "block until jobs are done (exit 0 all finished, 1 any failed, 2 timeout)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_non_negative_seconds, metavar="S")
    p.add_argument("--poll", type=_positive_seconds, default=1.0, metavar="S",
                   help="seconds between checks (default 1)")

    p = command("results", cmd_results, "print transcripts (txt, srt, vtt) or results and failures (json)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--format", type=_format, choices=FORMATS, default="txt", help="text is txt")

    p = command("list", cmd_list, "list jobs by state and queue")
    p.add_argument("--state", choices=("queued", "scheduled", "deferred", "started", "finished", "failed",
                                       "canceled"))
    p.add_argument("--queue")
    p.add_argument("--limit", type=_positive_int, default=100)
    p.add_argument("--offset", type=_non_negative_int, default=0)

    p = command("cancel", cmd_cancel, "cancel jobs (running ones stop at the worker's next stage)")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command("requeue", cmd_requeue, "put failed or canceled jobs back on their queue")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all-failed", action="store_true", help="every job in the failed registries")
    p.add_argument("--queue", help="with --all-failed: only this queue's failed jobs")

    command("info", cmd_info, "queue depths and workers")

    p = command("worker", cmd_worker, "run the MLX worker in this process (macOS, Apple silicon)")
    p.add_argument("--model", metavar="DIR_OR_REPO", help="checkpoint directory or hub repo id "
                   "(default: the settings' model, AUDIOQ_MODEL)")
    p.add_argument("--queue", action="append", metavar="Q", help="repeatable, highest priority first")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--max-jobs", type=_positive_int, metavar="N")
    p.add_argument("--name")

    p = command("transcribe", cmd_transcribe, "run the model on local files, no queue")
    p.add_argument("files", nargs="+", metavar="AUDIO")
    p.add_argument("--model", metavar="DIR_OR_REPO", help="default: the settings' model, AUDIOQ_MODEL")
    p.add_argument("--task", choices=("transcribe", "translate", "prompt"),
                   help="default: prompt with --prompt, else transcribe")
    p.add_argument("--target-language")
    p.add_argument("--prompt")
    p.add_argument("--language")
    p.add_argument("--max-new-tokens", type=_positive_int)
    p.add_argument("--format", type=_format, choices=FORMATS, help="render each result (default: its text)")
    p.add_argument("--output-dir", metavar="DIR", help="write DIR/<name>.<format> per file (default format txt)")
    return parser


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _error_message(exc: BaseException, settings: Settings | None) -> str:
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        url = _redacted(settings.redis_url) if settings else "the configured URL"
        return f"cannot reach Redis at {url}: {exc}"
    if isinstance(exc, ValidationError):
        return f"invalid request: {describe_validation_error(exc)}"
    if isinstance(exc, (ManifestError, CommandError, AudioqError, StorageError, ValueError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    if type(exc).__module__.startswith(("botocore", "boto3")):
        return f"storage: {exc}"
    if isinstance(exc, redis.RedisError):
        return f"Redis: {exc}"
    return f"unexpected error: {type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    settings: Settings | None = None
    try:
        try:
            settings = load_settings(args.config, redis_url=args.redis_url)
        except ValidationError as exc:
            raise CommandError(f"invalid settings: {describe_validation_error(exc)}") from None
        return args.handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("AUDIOQ_DEBUG"):
            raise
        _say(_error_message(exc, settings))
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
