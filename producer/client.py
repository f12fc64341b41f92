"""The producer's Python API: put audio jobs on the queues and read what became of them.

Every job is an RQ job with the JSON serializer. Its function is ``record.TASK_FUNC``,
named by string (the producer never imports worker code), and its only argument is the
validated request dict. Two guarantees shape this module:

- **No duplicates.** A job id comes from the request (or is given explicitly), and the
  job is only written if no job with that id exists. That check and the write happen in
  one atomic step in Redis, so re-running an enqueue, a manifest or a whole overnight
  backlog never creates or runs a job twice. Single enqueues use RQ's ``unique=True``.
  Bulk enqueues pipeline RQ's own unique-enqueue Lua script (the one ``unique=True``
  runs), because RQ's ``enqueue_many`` has no uniqueness option.
- **Reads leave jobs alone.** ``status``, ``list`` and ``info`` never run RQ's registry
  cleanup: it would fire failure callbacks and move jobs between registries from a
  producer process, which is a worker's job. Reads are not strictly write-free, though.
  Two bookkeeping writes touch no job: ``list`` and ``info`` drop CanceledJobRegistry
  entries whose job record has expired (RQ's cleanup never visits that registry; see
  ``_PRUNE_CANCELED``), and ``info``'s ``Worker.all()`` is RQ's, which removes the
  registrations of workers whose key has expired (SREM on ``rq:workers``).
"""

from __future__ import annotations

import posixpath
import time
from typing import Any, Callable, Iterable, Sequence

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import (BaseRegistry, CanceledJobRegistry, DeferredJobRegistry, FailedJobRegistry,
                         FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry)
from rq.results import Result
from rq.scripts import _build_hset_args, get_unique_enqueue_script
from rq.utils import now
from rq.worker import Worker

from producer import record
from producer.connection import connect
from producer.failures import FailureCode
from producer.manifest import (EnqueueItem, ManifestError, check_job_id, check_priority, item_from_dict,
                               read_manifest, within_limits)
from producer.s3 import listing_error, s3_client, split_s3_uri
from producer.schema import JobFailure, JobRequest, JobResult
from producer.settings import Settings, load_settings
from producer.status import (ActionOutcome, EnqueueOutcome, Info, JobStatus, QueueInfo, WorkerInfo,
                             build_status)

# Jobs per pipelined round trip in bulk enqueues.
BULK_BATCH = 500

# Known audio file extensions for prefix enqueues. Formats the worker cannot decode
# (m4a, aac, webm, ...) are still taken, so the user gets a precise
# ``unsupported_format`` failure rather than a file skipped without a word.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".caf",
    ".m4a", ".aac", ".webm", ".wma", ".amr", ".mka",
})

LIST_STATES = ("queued", "scheduled", "deferred", "started", "finished", "failed", "canceled")
_REGISTRIES: dict[str, type[BaseRegistry]] = {
    "scheduled": ScheduledJobRegistry, "deferred": DeferredJobRegistry, "started": StartedJobRegistry,
    "finished": FinishedJobRegistry, "failed": FailedJobRegistry, "canceled": CanceledJobRegistry,
}
_CANCELABLE = {RQStatus.CREATED, RQStatus.QUEUED, RQStatus.SCHEDULED, RQStatus.DEFERRED}
_REQUEUEABLE = {RQStatus.FAILED, RQStatus.STOPPED, RQStatus.CANCELED}

# KEYS: a CanceledJobRegistry. ARGV: the job key prefix. Removes the entries whose job
# hash no longer exists and returns how many are left. RQ adds a canceled job with score
# "now" and never cleans that registry (``clean_registries`` skips it), so without this
# the canceled count would grow with every job ever canceled. Atomic, so an id whose
# hash expired and that was enqueued and canceled again meanwhile is never dropped.
_PRUNE_CANCELED = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
    if redis.call('EXISTS', ARGV[1] .. id) == 0 then
        redis.call('ZREM', KEYS[1], id)
    end
end
return redis.call('ZCARD', KEYS[1])
"""


class _Unreadable(Exception):
    """A record that cannot be read; its text is the reason shown."""


def _reason(exc: BaseException) -> str:
    """One line on why a record cannot be read, for ``JobStatus.reason``."""
    if isinstance(exc, _Unreadable):
        return str(exc)
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return "its key holds another Redis type, not a job hash"
    if isinstance(exc, NoSuchJobError):  # RQ's word for a hash without "data"
        return "it has no 'data' field (the function to run and its arguments)"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WaitTimeout(TimeoutError):
    """``wait`` ran out of time. ``statuses`` holds the last status seen for every job."""

    def __init__(self, statuses: list[JobStatus]):
        pending = [s.id for s in statuses if not s.terminal]
        super().__init__(f"{len(pending)} of {len(statuses)} jobs not done yet")
        self.statuses = statuses


class Client:
    """A connection to audioq's queues. Cheap to create; holds no state besides the connection."""

    def __init__(self, settings: Settings | None = None, connection: redis.Redis | None = None):
        self.settings = settings or load_settings()
        self.connection = connection or connect(self.settings, socket_connect_timeout=5, socket_timeout=30)
        self._queues: dict[str, Queue] = {}
        self._prune_canceled = self.connection.register_script(_PRUNE_CANCELED)

    # ----------------------------------------------------------------- queues
    @property
    def job_timeout(self) -> int:
        """RQ's hard deadline: the worker's longest allowed job plus a margin."""
        return self.settings.hard_timeout

    @property
    def cancel_key_ttl(self) -> int:
        """Long enough to outlive any run of the job it names, short enough not to linger."""
        return self.job_timeout + 300

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.connection, serializer=record.SERIALIZER,
                                       default_timeout=self.job_timeout)
        return self._queues[name]

    def queue_name(self, queue: str | None = None, priority: str | None = None) -> str:
        """Pick a queue: by name, or by priority (settings.queues lists them high → low)."""
        names = self.settings.queues
        if queue is not None and priority is not None:
            raise ValueError("give a queue or a priority, not both")
        if queue is not None:
            if queue not in names:
                raise ValueError(f"unknown queue {queue!r}: configured queues are {', '.join(names)}")
            return queue
        chosen = {"high": names[0], "default": self.settings.default_queue, "low": names[-1]}
        return chosen[check_priority(priority or "default")]

    # ---------------------------------------------------------------- enqueue
    def _job_options(self, request: JobRequest) -> dict[str, Any]:
        payload = request.model_dump(mode="json")
        return dict(args=(payload,), timeout=self.job_timeout, result_ttl=self.settings.result_ttl,
                    failure_ttl=self.settings.failure_ttl, meta={record.META_REQUEST: payload},
                    description=request.audio_uri)

    def _origins(self, job_ids: Sequence[str]) -> list[str | None]:
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "origin")
            return [v.decode() if v else None for v in pipe.execute()]

    def enqueue(self, request: JobRequest | dict, *, job_id: str | None = None, queue: str | None = None,
                priority: str | None = None) -> EnqueueOutcome:
        """Enqueue one request. If a job with the id already exists, nothing is written."""
        if not isinstance(request, JobRequest):
            request = JobRequest.model_validate(request)
        self._check_limits(request)
        job_id = check_job_id(job_id) if job_id is not None else request.derived_job_id()
        q = self.queue(self.queue_name(queue, priority))
        try:
            q.enqueue_call(record.TASK_FUNC, job_id=job_id, unique=True, **self._job_options(request))
        except DuplicateJobError:
            return EnqueueOutcome(job_id=job_id, created=False, queue=self._origins([job_id])[0] or q.name)
        return EnqueueOutcome(job_id=job_id, created=True, queue=q.name)

    def _check_limits(self, request: JobRequest) -> None:
        try:
            within_limits(request, self.settings)
        except ValueError as exc:
            raise ValueError(f"invalid request: {exc}") from None

    def _items(self, requests: Iterable[JobRequest | dict | EnqueueItem]) -> list[EnqueueItem]:
        items: list[EnqueueItem] = []
        problems: list[tuple[int, str]] = []
        for number, entry in enumerate(requests, start=1):
            try:
                if isinstance(entry, EnqueueItem):
                    within_limits(entry.request, self.settings)
                    items.append(entry)
                elif isinstance(entry, JobRequest):
                    items.append(EnqueueItem(request=within_limits(entry, self.settings)))
                else:
                    items.append(item_from_dict(entry, self.settings))
            except ValueError as exc:
                problems.append((number, str(exc)))
        if problems:
            raise ManifestError("requests", problems, unit="item")
        return items

    def enqueue_many(self, requests: Iterable[JobRequest | dict | EnqueueItem], *, queue: str | None = None,
                     priority: str | None = None, on_progress: Callable[[int, int], None] | None = None,
                     batch_size: int = BULK_BATCH) -> list[EnqueueOutcome]:
        """Enqueue many requests, pipelined; all are validated before any is written.

        Dicts may carry ``job_id`` and ``priority`` like manifest rows; an item's own
        priority wins over ``queue``/``priority``. ``on_progress(done, total)`` is called
        after every batch. Existing ids are reported with ``created=False``.
        """
        items = self._items(requests)
        plan = []
        for item in items:
            name = self.queue_name(priority=item.priority) if item.priority else self.queue_name(queue, priority)
            job_id = check_job_id(item.job_id) if item.job_id else item.request.derived_job_id()
            plan.append((job_id, name, item.request))

        outcomes: list[EnqueueOutcome] = []
        for start in range(0, len(plan), batch_size):
            batch = plan[start:start + batch_size]
            created = self._create_batch(batch)
            existing = [job_id for (job_id, _, _), new in zip(batch, created) if not new]
            origins = dict(zip(existing, self._origins(existing))) if existing else {}
            for (job_id, name, _), new in zip(batch, created):
                queue_name = name if new else (origins.get(job_id) or name)
                outcomes.append(EnqueueOutcome(job_id=job_id, created=new, queue=queue_name))
            if on_progress:
                on_progress(len(outcomes), len(plan))
        return outcomes

    def _create_batch(self, batch: list[tuple[str, str, JobRequest]]) -> list[bool]:
        """Write each job unless its id exists: RQ's unique-enqueue script, pipelined.

        ``unique=True`` runs the same script through ``rq.scripts.save_unique_job``, but one
        round trip per job, and it raises on a duplicate; here it is queued on a pipeline
        (one round trip per batch) and its 0/1 reply read back. The hash fields come from
        RQ's own ``_build_hset_args`` (private, hence ``rq<3`` in pyproject), so a bulk job's
        record is field for field what a single enqueue writes.
        """
        script = get_unique_enqueue_script(self.connection)
        with self.connection.pipeline(transaction=False) as pipe:
            for name in {name for _, name, _ in batch}:
                pipe.sadd(Queue.redis_queues_keys, self.queue(name).key)
            for job_id, name, request in batch:
                q = self.queue(name)
                job = q.create_job(record.TASK_FUNC, job_id=job_id, status=RQStatus.QUEUED,
                                   **self._job_options(request))
                job.enqueued_at = now()
                ttl = job.ttl if job.ttl is not None else -1
                script(keys=[job.key, q.key], args=[job.id, "R", ttl, *_build_hset_args(job)], client=pipe)
            replies = pipe.execute()
        return [bool(r) for r in replies[-len(batch):]]

    def enqueue_manifest(self, path: str, *, queue: str | None = None, priority: str | None = None,
                         on_progress: Callable[[int, int], None] | None = None) -> list[EnqueueOutcome]:
        """Enqueue a JSONL or CSV manifest (see ``producer.manifest``); any bad row → nothing enqueued."""
        return self.enqueue_many(read_manifest(path, self.settings), queue=queue, priority=priority, on_progress=on_progress)

    def list_audio(self, s3_uri_prefix: str, *, all_objects: bool = False) -> list[str]:
        """``s3://`` URIs of the objects under a prefix, in key order; ``StorageError`` when it cannot be listed.

        "Directory" marker keys (ending in ``/``) are always skipped. Unless
        ``all_objects``, only keys with a known audio extension are taken.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(s3_uri_prefix)
        uris = []
        try:
            pages = s3_client(self.settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    if all_objects or posixpath.splitext(key)[1].lower() in AUDIO_EXTENSIONS:
                        uris.append(f"s3://{bucket}/{key}")
        except (BotoCoreError, ClientError) as exc:
            raise listing_error(exc, s3_uri_prefix) from None
        return uris

    def enqueue_prefix(self, s3_uri_prefix: str, *, all_objects: bool = False, queue: str | None = None,
                       priority: str | None = None, on_progress: Callable[[int, int], None] | None = None,
                       **request_fields: Any) -> list[EnqueueOutcome]:
        """One job per audio object under an S3 prefix, all with the same ``request_fields``."""
        if "audio_uri" in request_fields:
            raise ValueError("audio_uri comes from the listed objects; do not pass it")
        uris = self.list_audio(s3_uri_prefix, all_objects=all_objects)
        if not uris:
            return []
        # Validated here, not as items: a bad field is one error, not one per object.
        requests = [JobRequest.model_validate({**request_fields, "audio_uri": uri}) for uri in uris]
        self._check_limits(requests[0])  # the text fields are the same for all
        return self.enqueue_many(requests, queue=queue, priority=priority, on_progress=on_progress)

    # ----------------------------------------------------------------- status
    def status(self, job_id: str) -> JobStatus:
        return self.status_many([job_id])[0]

    def status_many(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """Statuses in the order asked, in two pipelined round trips whatever the count.

        The first reads the job hashes. The second reads queue positions of waiting jobs
        and the latest result of ended ones. A record that cannot be read (not a job hash,
        a field RQ cannot parse, a result that is not JSON) is reported as ``unreadable``
        with its reason; the others are reported as usual.
        """
        return self._statuses([check_job_id(job_id) for job_id in job_ids])

    def _statuses(self, ids: Sequence[str]) -> list[JobStatus]:
        """``status_many`` for ids as found in Redis: an id audioq could not have written is unreadable too."""
        jobs = self._jobs(ids)
        asks: list[tuple[int, str]] = []
        with self.connection.pipeline(transaction=False) as pipe:
            for index, job in enumerate(jobs):
                if not isinstance(job, Job):
                    continue
                rq_status = job.get_status(refresh=False)
                if rq_status in (RQStatus.QUEUED, RQStatus.CREATED) and job.origin:
                    pipe.lpos(self.queue(job.origin).key, job.id)
                    asks.append((index, "position"))
                elif rq_status in (RQStatus.FINISHED, RQStatus.FAILED, RQStatus.STOPPED):
                    pipe.xrevrange(Result.get_key(job.id), "+", "-", count=1)
                    asks.append((index, "latest"))
            replies = pipe.execute(raise_on_error=False) if asks else []
        found: dict[int, dict[str, Any]] = {}
        for (index, what), reply in zip(asks, replies):
            found[index] = {what: reply}
        statuses = []
        for index, (job_id, job) in enumerate(zip(ids, jobs)):
            try:
                if isinstance(job, str):
                    raise _Unreadable(job)
                asked = found.get(index, {})
                if "latest" in asked:
                    asked["latest"] = self._result_from_stream(job_id, asked["latest"])
                elif isinstance(asked.get("position"), Exception):
                    raise asked["position"]
                statuses.append(build_status(job_id, job, **asked))
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:  # hostile data can break any parser; it is the record's fault
                statuses.append(JobStatus(id=job_id, state="unreadable", reason=_reason(exc)))
        return statuses

    def _jobs(self, ids: Sequence[str]) -> list[Job | str | None]:
        """Each id's parsed job, None when it has no record, or the reason its record cannot be read."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Job.key_for(job_id))
            replies = pipe.execute(raise_on_error=False)
        jobs: list[Job | str | None] = []
        for job_id, raw in zip(ids, replies):
            try:
                job = Job(job_id, connection=self.connection, serializer=record.SERIALIZER)  # checks the id
                if isinstance(raw, Exception):
                    raise raw
                if not raw:
                    jobs.append(None)
                    continue
                job.restore(raw)
                jobs.append(job)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:
                jobs.append(_reason(exc))
        return jobs

    def _result_from_stream(self, job_id: str, entries: list) -> Result | None:
        if isinstance(entries, Exception):
            raise entries
        if not entries:
            return None
        result_id, payload = entries[0]
        try:
            return Result.restore(job_id, result_id.decode(), payload, connection=self.connection,
                                  serializer=record.SERIALIZER)
        except Exception as exc:
            raise _Unreadable(f"its latest result cannot be read ({_reason(exc)})") from None

    def results(self, job_ids: Sequence[str]) -> dict[str, JobResult | JobFailure | None]:
        """The result of each finished job, the failure of each failed or canceled one, else None."""
        return {s.id: s.result or s.failure for s in self.status_many(job_ids)}

    def _fingerprints(self, job_ids: Sequence[str]) -> dict[str, tuple]:
        """(status, progress) per job, cheaply: one HGET per job, meta only for running ones."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            raw = dict(zip(job_ids, pipe.execute(raise_on_error=False)))  # WRONGTYPE: an error, never "started"
        running = [job_id for job_id, st in raw.items() if st == b"started"]
        metas = {}
        if running:
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id in running:
                    pipe.hget(Job.key_for(job_id), "meta")
                metas = dict(zip(running, pipe.execute()))
        return {job_id: (raw[job_id], metas.get(job_id)) for job_id in job_ids}

    def wait(self, job_ids: Sequence[str], timeout: float | None = None, poll: float = 1.0,
             on_update: Callable[[JobStatus], None] | None = None) -> list[JobStatus]:
        """Block until every job is finished, failed, canceled or not found.

        Polls cheaply and builds a full status only for jobs whose state or progress
        changed; ``on_update`` gets each of those. Raises ``WaitTimeout`` after ``timeout``
        seconds.
        """
        if not poll > 0:
            raise ValueError(f"poll must be a positive number of seconds, not {poll!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        ids = list(dict.fromkeys(check_job_id(job_id) for job_id in job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: dict[str, tuple] = {}
        latest: dict[str, JobStatus] = {}
        pending = ids
        while True:
            prints = self._fingerprints(pending)
            changed = [job_id for job_id in pending if seen.get(job_id) != prints[job_id]]
            for status in self.status_many(changed):
                seen[status.id] = prints[status.id]
                latest[status.id] = status
                if on_update:
                    on_update(status)
            pending = [job_id for job_id in pending if not latest[job_id].terminal]
            if not pending:
                return [latest[job_id] for job_id in ids]
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout([latest[job_id] for job_id in ids])
            pause = poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0.0))
            time.sleep(pause)

    def _ids_in(self, state: str, queue_name: str, count: int) -> list[str]:
        if count <= 0:
            return []
        if state == "queued":
            return self.queue(queue_name).get_job_ids(0, count)
        if state == "canceled":
            self._canceled_count(queue_name)  # so expired entries take no place in the page
        registry = _REGISTRIES[state](queue_name, connection=self.connection, serializer=record.SERIALIZER)
        return registry.get_job_ids(0, count - 1, cleanup=False)

    def list(self, state: str | None = None, queue: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobStatus]:
        """Jobs by RQ's queues and registries: ``queued`` reads the queue, other states their registry.

        Without ``state``, every state in lifecycle order. Registry entries whose job has
        already expired are left out (and dropped from CanceledJobRegistry, see ``info``).
        """
        if state is not None and state not in LIST_STATES:
            raise ValueError(f"unknown state {state!r}: choose from {', '.join(LIST_STATES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a whole number >= 1, not {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a whole number >= 0, not {offset!r}")
        states = [state] if state else list(LIST_STATES)
        names = [self.queue_name(queue=queue)] if queue else self.settings.queues
        ids: list[str] = []
        for st in states:
            for name in names:
                ids.extend(self._ids_in(st, name, offset + limit - len(ids)))
        ids = list(dict.fromkeys(ids))[offset:offset + limit]
        return [s for s in self._statuses(ids) if s.state != "not_found"]

    # ---------------------------------------------------------------- actions
    def cancel(self, job_id: str) -> ActionOutcome:
        """Cancel a job: at once if it has not started, at the worker's next stage if it has.

        A waiting job is canceled with RQ (CanceledJobRegistry) and gets a ``canceled``
        failure in its meta. Its record then expires after ``failure_ttl`` like a failed
        one. The cancel key is set in both cases. If a worker dequeued the job a moment
        before the cancel, the key still stops it.
        """
        check_job_id(job_id)
        key = Job.key_for(job_id)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "status")
                    if raw is None:
                        pipe.unwatch()
                        return ActionOutcome(job_id=job_id, action="not_found", state="not_found",
                                             message="no such job")
                    rq_status = RQStatus(raw.decode())
                    if rq_status in _CANCELABLE:
                        self._cancel_waiting(job_id, pipe)
                        return ActionOutcome(job_id=job_id, action="canceled", state="canceled",
                                             message="canceled before it started")
                    pipe.unwatch()
                    break
                except redis.WatchError:
                    continue
        if rq_status == RQStatus.STARTED:
            self.connection.set(record.cancel_key(job_id), "1", ex=self.cancel_key_ttl)
            return ActionOutcome(job_id=job_id, action="cancel_requested", state="started",
                                 message="running: the worker stops it at its next stage boundary")
        state = self.status(job_id).state
        return ActionOutcome(job_id=job_id, action="unchanged", state=state, message=f"already {state}")

    def _cancel_waiting(self, job_id: str, pipe) -> None:
        job = Job.fetch(job_id, connection=self.connection, serializer=record.SERIALIZER)
        attempt = job.meta.get(record.META_ATTEMPT)
        failure = JobFailure(code=FailureCode.CANCELED, message="canceled before it started", retryable=False,
                             attempt=attempt if isinstance(attempt, int) and attempt >= 1 else 1)
        job.meta[record.META_FAILURE] = failure.model_dump(mode="json")
        pipe.multi()
        job.cancel(pipeline=pipe)
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        pipe.expire(job.key, self.settings.failure_ttl)
        pipe.set(record.cancel_key(job_id), "1", ex=self.cancel_key_ttl)
        pipe.execute()

    def requeue(self, job_ids: Sequence[str] | None = None, *, all_failed: bool = False,
                queue: str | None = None) -> list[ActionOutcome]:
        """Put failed or canceled jobs back on their queue, as if new.

        The meta failure, progress and retry note, the cancel key and RQ's retry count
        (``number_of_retries``, which the worker compares to ``storage_retries``) are
        cleared, so the job gets its storage retries again; the attempt and lost-worker
        counts are kept. ``all_failed`` takes every job in the
        failed registries of all configured queues, or of ``queue`` only.
        """
        if bool(job_ids) == all_failed:
            raise ValueError("give job ids or all_failed=True (not both)")
        if queue is not None and not all_failed:
            raise ValueError("queue only narrows all_failed")
        if all_failed:
            names = [self.queue_name(queue=queue)] if queue else self.settings.queues
            job_ids = [job_id for name in names
                       for job_id in FailedJobRegistry(name, connection=self.connection,
                                                       serializer=record.SERIALIZER).get_job_ids(cleanup=False)]
        return [self._requeue_one(check_job_id(job_id)) for job_id in job_ids]

    def _requeue_one(self, job_id: str) -> ActionOutcome:
        key = Job.key_for(job_id)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    try:
                        job = Job.fetch(job_id, connection=self.connection, serializer=record.SERIALIZER)
                    except NoSuchJobError:
                        pipe.unwatch()
                        return ActionOutcome(job_id=job_id, action="not_found", state="not_found",
                                             message="no such job")
                    if job.get_status(refresh=False) not in _REQUEUEABLE:
                        pipe.unwatch()
                        state = self.status(job_id).state
                        return ActionOutcome(job_id=job_id, action="unchanged", state=state,
                                             message=f"{state}: only failed or canceled jobs are requeued")
                    for name in (record.META_FAILURE, record.META_PROGRESS, record.META_RETRY):
                        job.meta.pop(name, None)
                    job.started_at = job.ended_at = None
                    job.number_of_retries = None
                    pipe.multi()
                    for registry in (FailedJobRegistry, CanceledJobRegistry):
                        pipe.zrem(registry(job.origin, connection=self.connection).key, job_id)
                    self.queue(job.origin).enqueue_job(job, pipeline=pipe)
                    # Job.save writes only the fields it has: a None one must go from the hash.
                    pipe.hdel(key, "exc_info", "number_of_retries")
                    pipe.persist(key)
                    pipe.delete(record.cancel_key(job_id))
                    pipe.execute()
                    return ActionOutcome(job_id=job_id, action="requeued", state="queued",
                                         message=f"back on queue {job.origin}")
                except redis.WatchError:
                    continue

    # ------------------------------------------------------------------- info
    def _canceled_count(self, queue_name: str) -> int:
        """Jobs in the queue's CanceledJobRegistry that still exist; expired entries are dropped."""
        key = CanceledJobRegistry(queue_name, connection=self.connection).key
        return int(self._prune_canceled(keys=[key], args=[Job.redis_job_namespace_prefix]))

    def info(self) -> Info:
        """Depth of every queue (configured ones first) and every registered worker.

        Counts are registry sizes, except ``canceled``: RQ never cleans CanceledJobRegistry,
        so its entries whose job record has expired are dropped first (``_PRUNE_CANCELED``,
        one atomic script per queue; it touches no job), and ``canceled`` counts only jobs
        that still exist. The other registries are cleaned by the workers' maintenance.
        """
        registered = [q.name for q in Queue.all(connection=self.connection, serializer=record.SERIALIZER)]
        names = list(dict.fromkeys([*self.settings.queues, *sorted(registered)]))
        canceled = {name: self._canceled_count(name) for name in names}
        counted = ("started", "finished", "failed", "scheduled", "deferred")
        with self.connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(self.queue(name).key)
                pipe.lindex(self.queue(name).key, 0)
                for state in counted:
                    pipe.zcard(_REGISTRIES[state](name, connection=self.connection).key)
            replies = pipe.execute()
        width = 2 + len(counted)
        rows = [replies[i * width:(i + 1) * width] for i in range(len(names))]
        heads = [row[1].decode() if row[1] else None for row in rows]
        enqueued = self._enqueued_at([h for h in heads if h])
        queues = []
        for name, row, head in zip(names, rows, heads):
            counts = dict(zip(counted, row[2:]), canceled=canceled[name])
            since = enqueued.get(head) if head else None
            age = (now() - since).total_seconds() if since else None
            queues.append(QueueInfo(name=name, queued=row[0], oldest_queued_seconds=age, **counts))
        return Info(queues=queues, workers=self._workers())

    def _enqueued_at(self, job_ids: list[str]) -> dict[str, Any]:
        if not job_ids:
            return {}
        return {job.id: job.enqueued_at for job in self._jobs(job_ids) if isinstance(job, Job) and job.enqueued_at}

    def _workers(self) -> list[WorkerInfo]:
        """RQ's registered workers; one whose audioq beat has lapsed reads ``lost`` (its process is
        gone, though RQ keeps its registration, "busy" and all, for minutes)."""
        workers = []
        for w in Worker.all(connection=self.connection, serializer=record.SERIALIZER):
            beating = self.connection.exists(record.worker_beat_key(w.name))
            workers.append(WorkerInfo(
                name=w.name, state=w.get_state() if beating else "lost", current_job=w.get_current_job_id(),
                last_heartbeat=w.last_heartbeat, queues=w.queue_names(),
                successful_jobs=w.successful_job_count, failed_jobs=w.failed_job_count))
        return sorted(workers, key=lambda w: w.name)
