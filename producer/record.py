"""Where a job's state lives in Redis: the one place both sides agree on names.

An audioq job is an RQ job (JSON serializer) whose function is ``TASK_FUNC`` with the
request dict as its only argument. Beside RQ's own fields, the job's ``meta`` holds:

- ``META_REQUEST``: the validated request (also the argument), for listing without decoding;
- ``META_PROGRESS``: a ``Progress`` dict while the job runs;
- ``META_FAILURE``: a ``JobFailure`` dict once the job failed (RQ status ``failed``, or
  ``canceled`` for a job canceled while queued);
- ``META_ATTEMPT``: how many times a worker has started the job;
- ``META_RETRY``: the ``JobFailure`` of the latest attempt the worker put back for another
  try (``storage_unavailable`` retried with backoff, ``worker_lost`` requeued by the reaper);
- ``META_LOST``: how many times the job was requeued because its worker died.

A finished job's ``JobResult`` dict is the RQ return value (``job.return_value()``).
Plain keys support what ``SimpleWorker`` cannot do by itself: a cancel flag the
worker checks at stage boundaries, a per-job liveness beat that expires when the
worker running it dies, and a per-worker beat that does the same for the worker's name
(so a crashed worker's name is free again and ``info`` can tell the dead from the live).
A hash holds a long job's finished chunks (one field per chunk index, written as each
completes) so that a later attempt resumes instead of starting over; it expires with the
job and is deleted once the job has its result.
"""

TASK_FUNC = "worker.task.process_audio_job"
SERIALIZER = "json"

META_REQUEST = "request"
META_PROGRESS = "progress"
META_FAILURE = "failure"
META_ATTEMPT = "attempt"
META_RETRY = "retry"
META_LOST = "lost"

KEY_PREFIX = "audioq:"


def cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}cancel:{job_id}"


def beat_key(job_id: str) -> str:
    return f"{KEY_PREFIX}beat:{job_id}"


def worker_beat_key(worker_name: str) -> str:
    return f"{KEY_PREFIX}worker-beat:{worker_name}"


def chunks_key(job_id: str) -> str:
    return f"{KEY_PREFIX}chunks:{job_id}"
