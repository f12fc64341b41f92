"""The RQ job class workers use: it can only ever call ``record.TASK_FUNC``.

RQ's JSON serializer is not a sandbox: ``Job.func`` imports whatever dotted name the job
hash holds (``os.system`` included), and the success/failure/stopped callback names are
imported the same way, by the worker on success or failure and by any worker's registry
cleanup for abandoned jobs. Anyone who can write to Redis could run code on the Mac.

RQ resolves all of these through four properties (``func``, ``success_callback``,
``failure_callback``, ``stopped_callback``), so they are overridden here, the one depth
every caller goes through: ``func`` refuses a job whose function, instance, arguments or
callback names are not an audioq job's, raising ``invalid_request`` inside the worker's
``perform_job`` so RQ fails the job normally; the callback properties never import
anything, because audioq jobs carry no callbacks.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job

from producer import record
from producer.failures import AudioqError, FailureCode
from worker.task import process_audio_job


class AudioJob(Job):
    def refusal(self) -> str | None:
        """Why this job is not an audioq job, or None when it is."""
        if self.func_name != record.TASK_FUNC:
            return f"job function {self.func_name!r} is not allowed; audioq workers only run {record.TASK_FUNC}"
        if self.instance is not None:
            return "audioq jobs call a plain function, not a method of a stored instance"
        names = [n for n in (self._success_callback_name, self._failure_callback_name,
                             self._stopped_callback_name) if n]
        if names:
            return f"audioq jobs carry no callbacks; this one names {', '.join(names)}"
        if len(self.args) != 1 or not isinstance(self.args[0], dict) or self.kwargs:
            return "an audioq job's only argument is its request dict"
        return None

    @property
    def func(self):
        reason = self.refusal()
        if reason:
            raise AudioqError(FailureCode.INVALID_REQUEST, reason)
        return process_audio_job

    @property
    def success_callback(self) -> Any:
        return None

    @property
    def failure_callback(self) -> Any:
        return None

    @property
    def stopped_callback(self) -> Any:
        return None
