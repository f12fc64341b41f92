"""A worker's name in Redis: taken back at once from a process that is gone, refused to a twin.

RQ refuses to start a worker whose name has a registration without a death date, and a
crashed worker never writes one: its hash lives on for ``worker_ttl + 60`` s (8 minutes),
so a Mac's worker restarted under the same ``--name`` after a crash (launchd's KeepAlive)
was refused for minutes, and ``audioq info`` listed the dead one as busy. audioq keeps a
second, short-lived sign of life: ``audioq:worker-beat:<name>``, refreshed with the job
beats every ``heartbeat_interval`` (idle or busy) and expiring after ``lost_after``.

A registration whose process is gone is cleared before RQ's ``register_birth`` runs. Gone
means: its beat has lapsed (any host), or it was on this host and its pid runs no process
(at once; a pid equal to our own is an earlier life of a container that restarted). A
registration that still beats is a live twin, and the new worker stops with a sentence
instead of RQ's ``ValueError``.
"""

from __future__ import annotations

import logging
import os
import socket

import redis
from rq import worker_registration
from rq.worker import Worker

from producer import record

log = logging.getLogger("audioq.worker")


class NameTaken(Exception):
    """Another live worker holds this name."""


def beat(connection: redis.Redis, worker_name: str, lost_after: float) -> None:
    connection.set(record.worker_beat_key(worker_name), os.getpid(), px=int(lost_after * 1000))


def forget(connection: redis.Redis, worker_name: str) -> None:
    connection.delete(record.worker_beat_key(worker_name))


def reclaim(worker: Worker) -> None:
    """Clear the registration of a gone process with ``worker``'s name; raise ``NameTaken`` if it lives."""
    connection = worker.connection
    old = Worker.find_by_key(worker.key, connection=connection, serializer=record.SERIALIZER)
    if old is None or old.death_date is not None:
        return  # no registration, or RQ's own: the dead one said goodbye
    pid_gone = old.hostname == socket.gethostname() and not _runs(old.pid)
    if connection.exists(record.worker_beat_key(worker.name)) and not pid_gone:
        raise NameTaken(f"worker name {worker.name!r} is in use by a live worker (pid {old.pid} on "
                        f"{old.hostname}, beating); stop that one first or give this one another --name")
    why = f"pid {old.pid} runs no process on this host" if pid_gone else "its heartbeat has lapsed"
    with connection.pipeline() as pipe:
        worker_registration.unregister(old, pipe)
        pipe.delete(worker.key, record.worker_beat_key(worker.name))
        pipe.execute()
    log.warning("worker name %r taken back from a gone worker (pid %s on %s): %s; its job, if any, goes to "
                "the reaper", worker.name, old.pid, old.hostname, why)


def _runs(pid: int | None) -> bool:
    """Whether ``pid`` is a running process other than this one (our own pid is an earlier life's)."""
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
