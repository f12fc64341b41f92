"""The RQ job class workers use: it runs only ``record.TASK_FUNC`` and acts on no field audioq does not write.

A job hash is data anyone with Redis access can write, and RQ acts on many of its fields:
``Job.func`` imports whatever dotted name the hash holds (``os.system`` included), callback
names are imported the same way, webhooks make the worker send HTTP requests, retry and
repeat counters make it run the job again, a finishing job's dependents set makes it enqueue
other jobs. audioq writes none of these but the function name and its one argument.

Everything RQ does goes through ``Job``'s attributes, so they are fixed here, the one
depth every caller (worker, scheduler, registry cleanup, reaper) goes through:

- ``func`` refuses a job whose data cannot be decoded or whose function, instance,
  arguments or callbacks are not an audioq job's, raising ``invalid_request`` inside the
  worker's ``perform_job`` so RQ fails the job normally (no traceback: ``func_name``, read
  earlier for the process title, never raises); the callback properties import nothing.
- The fields RQ acts on and audioq never writes (the ``_inert`` ones) read as absent, whatever
  the hash holds; only audioq's own retry policy (a ``Retry`` returned by the job, counted
  in ``number_of_retries``) schedules another attempt, and no job is released as another's
  dependent (``dependencies_are_met``).
- ``restore`` turns a hash RQ would misread into ``UnreadableRecord``, which the worker
  fails as ``invalid_request``: one without ``data`` (RQ takes it for a deleted job and
  drops it, leaving it "queued" in no queue) or a meta that is not a JSON object of
  audioq's fields. (An id audioq could not have written RQ refuses by itself.)
"""

from __future__ import annotations

from typing import Any

from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job

from producer import record
from producer.failures import AudioqError, FailureCode
from producer.printable import printable
from worker.task import process_audio_job


class UnreadableRecord(ValueError):
    """A job hash audioq cannot take as a job; the worker fails it as ``invalid_request``."""


def _inert(value: Any) -> property:
    """An attribute RQ acts on that audioq never writes: it reads as ``value``, and writes are dropped."""
    return property(lambda self: value, lambda self, _: None)


def _meta_problem(meta: object) -> str | None:
    """Why a restored meta is not one audioq wrote, or None."""
    if not isinstance(meta, dict) or set(meta) == {"unserialized"}:  # RQ's stand-in for meta it cannot decode
        return "its meta is not a JSON object (audioq writes it with RQ's JSON serializer)"
    for name in (record.META_ATTEMPT, record.META_LOST):
        value = meta.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"its meta field {name!r} must be a whole number >= 0, not {value!r}"
    return None


class AudioJob(Job):
    webhooks = _inert(())
    retries_left = _inert(None)
    retry_intervals = _inert(None)
    enqueue_at_front_on_retry = _inert(False)
    repeats_left = _inert(None)
    repeat_intervals = _inert(None)

    def restore(self, raw_data) -> None:
        try:
            super().restore(raw_data)
        except NoSuchJobError:  # RQ's word for a hash without "data"
            raise UnreadableRecord("it has no 'data' field (the function to run and its arguments)") from None
        problem = _meta_problem(self.meta)
        if problem:
            raise UnreadableRecord(problem)

    def dependencies_are_met(self, *args, **kwargs) -> bool:
        """audioq jobs depend on none: another job finishing never releases one, whatever Redis says."""
        return False

    @property
    def func_name(self) -> str | None:
        """RQ reads it for the process title before the job runs: data it cannot decode must not raise there."""
        try:
            return Job.func_name.fget(self)
        except DeserializationError:
            return None

    @func_name.setter
    def func_name(self, value) -> None:
        Job.func_name.fset(self, value)

    @property
    def number_of_retries(self) -> int | None:
        return self._retries_done

    @number_of_retries.setter
    def number_of_retries(self, value: int | None) -> None:
        # A crafted negative count would buy the job extra storage retries.
        self._retries_done = None if value is None else max(0, value)

    @property
    def description(self) -> str | None:
        """RQ logs the description: never with the newlines or escape codes a crafted one may hold."""
        return None if self._description is None else printable(self._description)

    @description.setter
    def description(self, value: str | None) -> None:
        self._description = value

    def refusal(self) -> str | None:
        """Why this job is not an audioq job, or None when it is."""
        try:
            self._deserialize_data()
        except DeserializationError:
            return ("the job's data is not the JSON list [function, instance, args, kwargs] "
                    "that RQ's JSON serializer writes")
        func_name, instance, args, kwargs = self._func_name, self._instance, self._args, self._kwargs
        if func_name != record.TASK_FUNC:
            return f"job function {func_name!r} is not allowed; audioq workers only run {record.TASK_FUNC}"
        if instance is not None:
            return "audioq jobs call a plain function, not a method of a stored instance"
        names = [n for n in (self._success_callback_name, self._failure_callback_name,
                             self._stopped_callback_name) if n]
        if names:
            return f"audioq jobs carry no callbacks; this one names {printable(', '.join(names))}"
        if not isinstance(args, (list, tuple)) or len(args) != 1 or not isinstance(args[0], dict) or kwargs != {}:
            return "an audioq job's only argument is its request dict (no other arguments, no keyword arguments)"
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
