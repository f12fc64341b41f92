"""A timeline of the engine's calls in a drain: decode steps, joins, tower and prefill calls, arrivals.

A benchmark's totals say how long the decode, tower and prefill took in all; they cannot say
why a drain's decode step costs twice the step of the engine fed at once, or how long the
batch takes to fill and to empty (docs/benchmarks.md, "A drain's timeline"). ``install``
wraps the engine's own methods in the process that imports it (benchmarks only:
``sitecustomize`` here, ``scripts/bench.py --timeline``); each stream's events go to
``<directory>/<pid>.jsonl`` when it ends, and ``summary`` reads them back.

The tower and prefill seconds are the engine's own (its stream totals, call by call). A
join's or a compaction's cache copies are lazy: they run with the next decode step, and as
``Scheduler`` pipelines its steps (the next one queued before the current one's tokens are
read) their device time can land in that step or the one after, so the summary gives both.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

EVENTS: list[list] = []
TOWER_FRAMES = [0, 0]  # the tower calls' frames so far: padded (rows x length), and the clips' own
COPIES = ("an append", "a placement", "a compaction")


def _now() -> float:
    return time.perf_counter()


def install(directory: str) -> None:
    from worker.gemma4 import engine, scheduler

    Scheduler, Engine = scheduler.Scheduler, engine.Engine
    step, join, compact = Scheduler._step, Scheduler._join, Scheduler._compact
    encoded, stream, tower_call = Engine._encoded, Engine.stream, Engine._tower

    def _step(self, finish):
        event = ["step", _now(), None, len(self.running)]
        EVENTS.append(event)  # before the step: a compaction as its rows leave belongs to the next one
        step(self, finish)
        event[2] = _now()

    def _join(self, live, first, batch, finish):
        """Called once per prefilled group, right after the engine added the group's seconds to its totals."""
        seconds = self.stats["prefill"] - getattr(self, "_timeline_prefill", 0.0)
        self._timeline_prefill = self.stats["prefill"]
        lengths, ended = [len(r.ids) + len(r.tokens) for r in live], _now()
        EVENTS.append(["prefill", ended - seconds, ended, len(live), max(lengths) * len(lengths), sum(lengths)])
        placed, appends = self.stats["placed"], self.stats["appends"]
        join(self, live, first, batch, finish)
        if self.stats["appends"] > appends:
            EVENTS.append(["copy", _now(), "an append"])
        elif self.stats["placed"] > placed:
            EVENTS.append(["copy", _now(), "a placement"])

    def _compact(self):
        before = self.stats["compactions"]
        compact(self)
        if self.stats["compactions"] > before:
            EVENTS.append(["copy", _now(), "a compaction"])

    def _tower(self, features, mask):
        """Counts the frames of a call that returned (one out of memory is split and counted in its halves).
        The mask is evaluated already (the front-end's), so counting its frames waits for nothing."""
        rows = tower_call(self, features, mask)
        TOWER_FRAMES[0] += mask.size
        TOWER_FRAMES[1] += int(mask.sum().item())
        return rows

    def _encoded(self, group, stop, on_done, stats):
        tower, calls, frames = stats["audio_tower"], stats["towers"], list(TOWER_FRAMES)
        rows = encoded(self, group, stop, on_done, stats)
        if stats["towers"] > calls:  # the group reached the tower (its front-end did not fail)
            ended = _now()
            EVENTS.append(["tower", ended - (stats["audio_tower"] - tower), ended, len(rows),
                           TOWER_FRAMES[0] - frames[0], TOWER_FRAMES[1] - frames[1]])
        return rows

    def _stream(self, feed, on_done, **options):
        feed_owner = getattr(feed, "__self__", None)  # the engine process's stream: clips read, not yet taken

        def timed_feed(free):
            clips = list(feed(free))
            if clips:
                EVENTS.append(["clips", _now(), len(clips)])
            if hasattr(feed_owner, "backlog"):
                EVENTS.append(["backlog", _now(), len(feed_owner.backlog)])
            return clips

        EVENTS.clear()
        started = _now()
        try:
            return stream(self, timed_feed, on_done, **options)
        finally:
            record = {"start": started, "end": _now(), "events": list(EVENTS)}
            try:
                with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as out:
                    out.write(json.dumps(record) + "\n")
            except OSError as exc:  # the stream's own outcome stands
                print(f"engine_timeline: stream not recorded: {exc}", file=sys.stderr)

    Scheduler._step, Scheduler._join, Scheduler._compact = _step, _join, _compact
    Engine._encoded, Engine.stream, Engine._tower = _encoded, _stream, _tower


def summary(directory: Path, min_clips: int = 8) -> list[str]:
    """A few lines per recorded stream of at least ``min_clips`` clips (warm-up streams are smaller)."""
    lines = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for number, record in enumerate(map(json.loads, path.read_text().splitlines()), 1):
            events = record["events"]
            if sum(e[2] for e in events if e[0] == "clips") >= min_clips:
                lines.append(f"process {path.stem}, stream {number}:")
                lines += ["  " + line for line in _stream_lines(record["start"], record["end"], events)]
    return lines


def _kind(events: list[list], name: str) -> list[list]:
    return [e for e in events if e[0] == name]


def _median_ms(values: list[float]) -> str:
    return f"median {1000 * statistics.median(values):.1f} ms" if values else "-"


def _stream_lines(start: float, end: float, events: list[list]) -> list[str]:
    steps, prefills, towers = _kind(events, "step"), _kind(events, "prefill"), _kind(events, "tower")
    clips = sum(e[2] for e in _kind(events, "clips"))
    steps = [e for e in steps if e[2] is not None]
    if not steps:
        return [f"{clips} clips in {end - start:.2f} s, no decode step"]
    peak = max(e[3] for e in steps)
    first = next(e[1] for e in events if e[0] == "clips")
    full = next(e[1] for e in steps if e[3] >= 0.9 * peak)
    last_prefill = prefills[-1][2] if prefills else start
    tail = [e for e in steps if e[1] >= last_prefill]
    after = {kind: ([], []) for kind in (*COPIES, "none")}  # the first and the second step after
    pending_copy, previous = None, None
    for e in events:
        if e[0] == "copy":
            pending_copy = pending_copy if pending_copy == "an append" else e[2]  # an append copies the most
        elif e[0] == "step" and e[2] is not None:
            kind = pending_copy or "none"
            after[kind][0].append(e[2] - e[1])
            if previous is not None:
                after[previous][1].append(e[2] - e[1])
            previous, pending_copy = (kind if kind != "none" else None), None
    padded, real = sum(e[4] for e in prefills), sum(e[5] for e in prefills)
    frames, real_frames = sum(e[4] for e in towers), sum(e[5] for e in towers)
    lines = [
        f"{clips} clips in {end - start:.2f} s: the first at {first - start:.2f} s, 90 % of the peak {peak} rows "
        f"at {full - start:.2f} s, the last prefill done at {last_prefill - start:.2f} s, then "
        f"{end - last_prefill:.2f} s ({len(tail)} steps of {statistics.mean(e[3] for e in tail) if tail else 0:.0f} "
        "rows on average)",
        f"decode: {len(steps)} steps of {statistics.mean(e[3] for e in steps):.0f} rows on average, "
        f"{sum(e[2] - e[1] for e in steps):.2f} s; the steps after " + "; ".join(
            f"{kind}: {len(first_after)}, {_median_ms(first_after)}"
            + (f" (the step after those: {_median_ms(second)})" if kind != "none" else "")
            for kind, (first_after, second) in after.items()),
        f"tower: {len(towers)} calls, {sum(e[2] - e[1] for e in towers):.2f} s, "
        f"{sum(e[3] for e in towers) / max(len(towers), 1):.1f} clips a call, "
        f"{1 - real_frames / frames if frames else 0:.0%} of their frames padding; prefill: {len(prefills)} calls, "
        f"{sum(e[2] - e[1] for e in prefills):.2f} s, {sum(e[3] for e in prefills) / max(len(prefills), 1):.1f} "
        f"rows a call, {1 - real / padded if padded else 0:.0%} of their tokens padding",
    ]
    backlog = _kind(events, "backlog")
    marks = [(m, next((e[2] for e in backlog if e[1] - start >= m), None)) for m in (0.5, 1, 2, 4, 8, 16, 32)]
    marks = [(m, waiting) for m, waiting in marks if waiting is not None]
    if marks:
        lines.append("clips read by the engine process and not yet taken, at "
                     + ", ".join(f"{m} s: {waiting}" for m, waiting in marks))
    return lines
