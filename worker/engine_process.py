"""The engine in a process of its own, behind the seam of ``Engine``: ``stream``, ``start_front_end``, ``warm_up``.

A worker's main thread shares one interpreter lock with its records, storage, prefetch and
maintenance threads; in a batched drain on the H200 that lock, not the device, bounded the
decode loop (docs/design.md, "The engine process"). Here the loop runs alone in a child
process and the worker talks to it over a socket (``engine_link``): clips go in with their
samples and log-mel frames (computed in the worker, ``start_front_end``; a clip waits here
until its frames are done, since frames the child computed itself would stall its loop: 5.1 s
of a 20 s drain on an H100), and before every decode step the child reports its room, the
clips that changed stage and their outcomes.

The worker keeps every decision about its jobs: a clip's stage hook (deadline, cancel,
progress, a job that ended) runs in the worker when the child reports the stage, and
again every ``TICK`` while it stays there; a hook that raises ends the clip at once in the
worker and the child drops its row at its next step. An exception out of ``stream`` (the
hard time limit, a shutdown) makes the child drop every row before the next stream starts.

The child dies with the worker: it exits as soon as its end of the socket reads end-of-file,
so a worker killed by SIGKILL leaves no engine behind. It ignores SIGINT and SIGTERM (a
terminal's Ctrl-C reaches the whole process group): the worker decides what a signal means.
If the child dies, ``stream`` raises ``EngineLost`` and the worker resolves its jobs.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import Tokenizer

from producer.failures import AudioqError, FailureCode
from worker import heap
from worker.engine_link import Link
from worker.failures import SHUTDOWN, classify
from worker.gemma4.config import load_config
from worker.gemma4.engine import ClipOutput, ClipRequest, DoneHook, Engine, Feed
from worker.gemma4.features import clip_features
from worker.gemma4.loader import resolve_checkpoint
from worker.gemma4.prompt import PromptBuilder
from worker.gemma4.scheduler import is_out_of_memory

TICK = 0.05  # seconds between the worker's checks of the clips in the engine when the child reports nothing
FRAMES_TICK = 0.005  # the same while clips wait here for their frames (a few ms each)
FRONT_END_THREADS = 8  # the worker's log-mel threads (NumPy releases the lock)

log = logging.getLogger("audioq.worker")


class EngineLost(RuntimeError):
    """The engine process exited or its socket broke: nothing it held can be finished."""


# ---------------------------------------------------------------------------------------- outcomes
def encode_outcome(outcome: ClipOutput | BaseException) -> dict:
    """A clip's outcome as JSON: an output, running out of memory (the worker retries with fewer rows),
    or a failure's code and message."""
    if isinstance(outcome, ClipOutput):
        return {"output": asdict(outcome)}
    if is_out_of_memory(outcome):
        return {"out_of_memory": f"{type(outcome).__name__}: {outcome}"}
    error = classify(outcome)
    return {"code": error.code.value, "message": error.message}


def decode_outcome(data: dict) -> ClipOutput | BaseException:
    if "output" in data:
        return ClipOutput(**data["output"])
    if "out_of_memory" in data:
        return MemoryError(data["out_of_memory"])
    return AudioqError(data["code"], data["message"])


# ---------------------------------------------------------------------------------------- the worker's side
@dataclass(eq=False)
class Flight:
    """A clip the child holds: the caller's request and the stage the child last reported."""

    clip: ClipRequest
    stage: str = ""


class EngineProcess:
    """The resident engine, run by a child process; the same calls as ``Engine`` for the worker."""

    def __init__(self, model: str, options: dict[str, Any]):
        path = resolve_checkpoint(model)  # a hub id is downloaded once, here
        config = load_config(path)
        self.prompts = PromptBuilder(Tokenizer.from_file(str(path / "tokenizer.json")), config.tokens)
        self.model_id = model
        self.lost: EngineLost | None = None
        self.link, theirs = Link.pair()
        root = str(Path(__file__).resolve().parents[1])  # this checkout's packages, installed or not
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.streams = 0  # streams started: every message of one names it, so none leaks into the next
        self.process = subprocess.Popen([sys.executable, "-P", "-m", "worker.engine_process", str(theirs.fileno()),
                                         str(path.resolve()), json.dumps(options)], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, name="audioq-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="audioq-engine-writer", daemon=True).start()
        self.front_end = ThreadPoolExecutor(max_workers=min(FRONT_END_THREADS, os.cpu_count() or 1),
                                            thread_name_prefix="audioq-front-end")
        try:
            header = self._next()
        except EngineLost as exc:
            raise AudioqError(FailureCode.MODEL_ERROR, f"the engine process did not start: {exc}") from exc
        if header["op"] == "failed":
            self.close()
            raise AudioqError(header["code"], header["message"])

    # -- the socket, on two threads of its own (a signal handler on the main thread never cuts a message)
    def _read(self) -> None:
        try:
            while True:
                self.inbox.put(self.link.receive())
        except Exception as exc:  # end-of-file, or a broken stream: the main thread raises EngineLost
            self.inbox.put(exc)

    def _write(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.link.send(*message)
            except Exception:  # the child is gone, or the message broke: the reader sees the link end
                self.link.close()
                return

    def _send(self, header: dict, arrays: list = ()) -> None:
        self.outbox.put((header, list(arrays)))

    def _next(self, timeout: float | None = None) -> dict | None:
        """The child's next message (None: nothing within ``timeout``)."""
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(message, BaseException):
            self.inbox.put(message)  # every later wait sees it too
            try:
                code = self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
            self.lost = EngineLost(f"the engine process {'broke' if code is None else f'exited with status {code}'} "
                                   f"({type(message).__name__}: {message})")
            raise self.lost
        return message[0]

    # -- Engine's calls
    def warm_up(self) -> float:
        self._send({"op": "warm_up"})
        return self._next()["seconds"]

    def start_front_end(self, clip: ClipRequest) -> None:
        """Compute the clip's log-mel frames in this process from now on; the child gets them with the clip."""
        if clip.samples is not None and clip.frames is None:
            clip.frames = self.front_end.submit(clip_features, clip.samples)

    def stream(self, feed: Feed, on_done: DoneHook) -> dict[str, float]:
        """``Engine.stream`` run by the child (see the module's docstring); returns the child's totals."""
        self.streams += 1
        self._send({"op": "stream", "stream": self.streams})
        run = _Stream(self, feed, on_done)
        try:
            return run.drive()
        except EngineLost:
            raise
        except BaseException as first:
            if not run.over:
                self._send({"op": "abort"})  # the child drops every row and ends the stream
                try:
                    run.until_ended()
                except BaseException as late:  # a signal while the child winds down, or the child gone
                    if isinstance(late, (*SHUTDOWN, EngineLost)) and not isinstance(first, SHUTDOWN):
                        raise  # a shutdown outranks what it interrupted; a lost engine is the worker's end
                    # otherwise the first reason stands: the time limit's alarm firing during a
                    # shutdown's wait must not turn the shutdown into a failed job and carry on (the
                    # child ends the old stream when the next one starts)
                    log.warning("stopped waiting for the engine process to end a cut stream (%s: %s); "
                                "going on with %s", type(late).__name__, late, type(first).__name__)
            raise

    def close(self) -> None:
        self.outbox.put(None)
        self.link.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.front_end.shutdown(wait=False, cancel_futures=True)


class _Stream:
    """One ``stream`` as the worker drives it: feed the child within its room, route its reports."""

    def __init__(self, engine: EngineProcess, feed: Feed, on_done: DoneHook):
        self.engine = engine
        self.feed = feed
        self.on_done = on_done
        self.id = engine.streams
        self.in_flight: dict[int, Flight] = {}
        self.held: list[ClipRequest] = []  # fed, waiting here for their log-mel frames before they go
        self.sent = 0  # clips sent this stream
        self.received = 0  # of those, the ones the child had read at its last report
        self.free = 0  # the room it reported then
        self.dropped = 0  # clips ended here while the child held them
        self.released = 0  # of those, the ones the child no longer held at its last report
        self.over = False  # the child ended the stream

    def room(self) -> int:
        """Rows the child can take: its last report's, less the clips sent since, plus the rows of clips
        ended here since (in-process, a row whose hook raises frees its room at once: a feed that saw
        none could wait for ever for a prepared job that will not fit)."""
        return max(self.free - (self.sent - self.received) + (self.dropped - self.released) - len(self.held), 0)

    def drive(self) -> dict[str, float]:
        self.absorb(self.next())  # the child's first report: its room
        while True:
            clips = list(self.feed(self.room()))
            self.held += clips
            self.send_ready()
            if not clips and not self.in_flight and not self.held:
                break
            header = self.next(TICK if not self.held else FRAMES_TICK)
            while header is not None:
                self.absorb(header)
                header = self.next(0)
            for key in list(self.in_flight):
                self.check(key)
        self.engine._send({"op": "end"})
        return self.until_ended()

    def next(self, timeout: float | None = None) -> dict | None:
        """The child's next message of this stream (those of an earlier one are left over: skipped)."""
        while (header := self.engine._next(timeout)) is not None and header.get("stream") != self.id:
            pass
        return header

    def until_ended(self) -> dict[str, float]:
        while (header := self.next())["op"] != "ended":
            self.absorb(header)
        self.over = True
        return header["stats"]

    def send_ready(self) -> None:
        """Send the held clips whose frames are done (a ready clip may pass one still waiting). A clip
        whose frames were never begun, failed or were cancelled goes as it is: the child computes
        them (or fails the clip as the engine would). A clip still waiting passes its ``front_end``
        check point, as in-process, so a job canceled or out of time meanwhile ends now, not once
        its frames are done. If the stream is cut while clips are held, they get no outcome, as
        clips not yet admitted in-process: the batch resolves their jobs."""
        waiting = []
        for clip in self.held:
            if clip.frames is None or clip.frames.done():
                self.send(clip)
                continue
            try:
                if clip.on_stage is not None:
                    clip.on_stage("front_end")
            except Exception as exc:
                self.on_done(clip, exc)
                continue
            waiting.append(clip)
        self.held = waiting

    def send(self, clip: ClipRequest) -> None:
        key = self.sent
        self.sent += 1
        self.in_flight[key] = Flight(clip)
        frames = clip.frames
        ready = frames is not None and not frames.cancelled() and frames.exception() is None
        arrays = [] if clip.samples is None else [clip.samples] + ([frames.result()] if ready else [])
        self.engine._send({"op": "clip", "key": key, "instruction": clip.instruction,
                           "max_new_tokens": clip.max_new_tokens}, arrays)

    def absorb(self, header: dict) -> None:
        self.received, self.free, self.released = header["received"], header["free"], header["released"]
        for key, stage in header["stages"]:
            if key in self.in_flight:
                self.in_flight[key].stage = stage
                self.check(key)
        for key, outcome in header["done"]:
            flight = self.in_flight.pop(key, None)
            if flight is not None:
                self.on_done(flight.clip, decode_outcome(outcome))

    def check(self, key: int) -> None:
        """The clip's stage hook, as the engine would call it; raising ends the clip here and drops its row there."""
        flight = self.in_flight.get(key)
        if flight is None or not flight.stage or flight.clip.on_stage is None:
            return
        try:
            flight.clip.on_stage(flight.stage)
        except Exception as exc:
            del self.in_flight[key]
            self.dropped += 1
            self.engine._send({"op": "drop", "keys": [key]})
            self.on_done(flight.clip, exc)


# ---------------------------------------------------------------------------------------- the child's side
class Dropped(Exception):
    """Raised from a row's stage hook in the child once the worker has ended its clip."""


class _Served:
    """One stream in the child: clips from the socket into ``Engine.stream``, reports back before every step."""

    def __init__(self, engine: Engine, link: Link, inbox: queue.SimpleQueue, stream: int):
        self.engine = engine
        self.link = link
        self.inbox = inbox
        self.stream = stream
        self.backlog: deque[ClipRequest] = deque()  # read, not yet fed to the engine
        self.running: set[int] = set()  # fed, outcome not yet reported
        self.dropped: set[int] = set()
        self.received = 0
        self.ended = False
        self.stages: dict[int, str] = {}  # reported so far
        self.changed: dict[int, str] = {}  # not yet reported
        self.done: list[list] = []
        self.released = 0  # dropped clips that hold nothing here any more
        self.last: tuple[int, int] | None = None  # (free, released) as last reported
        self.following: dict | None = None  # the next stream's start, read while this one wound down

    def run(self) -> None:
        stats = self.engine.stream(self.feed, self.on_done)
        stats["peak_mlx_memory_mb"] = mx.get_peak_memory() / 2**20  # the worker's own is not the model's
        self.link.send({"op": "ended", "stream": self.stream, "stats": stats})

    def feed(self, free: int) -> list[ClipRequest]:
        self.read(block=False)
        while not (self.running or self.backlog or self.ended):  # nothing to run: report, then wait
            self.report(free, force=True)
            self.read(block=True)
        taken = [self.backlog.popleft() for _ in range(min(free, len(self.backlog)))]
        self.running.update(clip.tag for clip in taken)
        self.report(free - len(taken) - len(self.backlog))
        return taken

    def read(self, block: bool) -> None:
        while self.following is None:  # what comes after the next stream's start is that stream's
            try:
                header, arrays = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            self.take(header, arrays)

    def take(self, header: dict, arrays: list) -> None:
        op = header["op"]
        if op == "clip":
            self.received += 1
            key = header["key"]
            frames = None
            if len(arrays) == 2:
                frames = Future()
                frames.set_result(arrays[1])
            self.backlog.append(ClipRequest(arrays[0] if arrays else None, header["instruction"],
                                            header["max_new_tokens"], on_stage=self.hook(key), tag=key,
                                            frames=frames))
        elif op == "drop":  # a running clip is released once its row has left, any other at once
            running = {k for k in header["keys"] if k in self.running}
            self.dropped |= running
            self.released += len(header["keys"]) - len(running)
            self.backlog = deque(c for c in self.backlog if c.tag not in header["keys"])
        elif op in ("end", "abort", "stream"):
            self.ended = True
            if op != "end":  # the worker left this stream: an abort, or it stopped waiting for the abort's end
                self.dropped |= self.running
                self.backlog.clear()
            if op == "stream":
                self.following = header

    def hook(self, key: int):
        def on_stage(stage: str) -> None:
            if key in self.dropped:
                raise Dropped(f"clip {key} ended in the worker")
            if self.stages.get(key) != stage:
                self.stages[key] = self.changed[key] = stage

        return on_stage

    def on_done(self, clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        key = clip.tag
        self.running.discard(key)
        self.stages.pop(key, None)
        self.changed.pop(key, None)
        if key in self.dropped:
            self.dropped.discard(key)
            self.released += 1
            return
        self.done.append([key, encode_outcome(outcome)])

    def report(self, free: int, force: bool = False) -> None:
        if not (force or self.done or self.changed or (free, self.released) != self.last):
            return
        self.link.send({"op": "report", "stream": self.stream, "received": self.received, "free": free,
                        "released": self.released, "stages": list(self.changed.items()), "done": self.done})
        self.changed, self.done, self.last = {}, [], (free, self.released)


def serve(link: Link, path: str, options: dict[str, Any]) -> None:
    """The child's life: load, say ready (or why not), then warm-ups and streams as the worker asks."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(link.receive())
        except EOFError:
            pass
        except BaseException:
            log.exception("the engine process cannot read from its worker")
        finally:
            os._exit(0)  # the worker is gone, or the stream broke: nothing here is anyone's any more

    threading.Thread(target=read, name="audioq-engine-reader", daemon=True).start()  # from the start: the
    try:                                                                               # worker may go mid-load
        engine = Engine.load(path, **options)
    except Exception as exc:
        error = classify(exc)
        link.send({"op": "failed", "code": error.code.value, "message": error.message})
        return
    link.send({"op": "ready"})
    following = None
    while True:
        header = following or inbox.get()[0]
        following = None
        if header["op"] == "warm_up":
            started = time.perf_counter()
            engine.warm_up()
            heap.set_aside()  # the loop's own collections then walk only what its streams made
            link.send({"op": "warmed", "seconds": time.perf_counter() - started})
        elif header["op"] == "stream":
            served = _Served(engine, link, inbox, header["stream"])
            served.run()
            following = served.following
        # anything else belongs to a stream that has ended (an abort that crossed its end): nothing to do


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from rq.logutils import setup_loghandlers

    setup_loghandlers("INFO", name="audioq")
    fd, path, options = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    serve(Link(socket.socket(fileno=fd)), path, options)


if __name__ == "__main__":
    main()
