"""Continuous batching: rows join a running decode batch and leave it one by one.

A row is one prompt ready for the decoder (ids, audio soft tokens, budget, stop ids, its
owner's check point). Before every decode step the scheduler admits waiting rows (under
the row limit and the memory budget), prefills them in groups and joins them to the
running batch; rows that stop, spend their budget or whose check point raises leave the
batch at once, so long outputs never hold short ones hostage.

A row that leaves is finished at once but leaves a hole: its cache columns stay, computed
for nothing, until a joining row takes its place (written over it, right-aligned, with
plain slices: no other row moves), holes are half the batch, or a hole is what keeps the
cache's oldest columns (the cache would outgrow the memory budget that admitted its rows).
A joining row longer than the batch's columns, or one more than there are holes, is
appended instead, which copies every row, so the holes left go then too; so do they when
the holes kept beside a placed row would let the cache outgrow the memory budget. Dropping
or appending rows copies every layer's cache (24 ms for 256 rows on the H200, two steps),
and rows leave at nearly every step; a hole costs little, because a step's time hardly
grows with its rows (docs/design.md, "Batching").

Running out of device memory fails nothing: a group whose prefill does not fit is split
in halves and retried (so is a group the model refuses, so that the row at fault fails
alone), and a row that does not fit beside the running rows waits, first in line, until
one of them has left; a decode step that does not fit sends every running row back to the
waiting line (prompt plus the tokens it has so far, re-prefilled later) and halves the row
limit, which doubles back after ``RECOVERY_STEPS`` steps that fit (twice as many after each
relapse). Only a row that does not fit even alone on the device fails (``model_error``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from producer.failures import AudioqError, FailureCode
from worker.gemma4.decoder import Decoder
from worker.gemma4.kv_batch import KVBatch

HOLES_SHARE = 0.5  # compact the batch when this share of its rows are holes
RECOVERY_STEPS = 256  # decode steps that fit after which a lowered row limit doubles (twice that after each relapse)
OOM_MARKERS = ("out of memory", "malloc]", "bad_alloc", "resource limit", "unable to allocate")


@dataclass(eq=False)
class Row:
    ids: list[int]
    audio: mx.array | None  # [n, H] soft tokens for the prompt's placeholders
    budget: int  # max new tokens
    stop: frozenset[int]
    hook: Callable[[str], None] | None = None  # raising drops this row alone
    owner: Any = None
    tokens: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    joined: float | None = None  # perf_counter when it first joined the batch

    @property
    def reserve(self) -> int:
        """Cache columns this row may come to hold."""
        return len(self.ids) + self.budget

    def check(self, stage: str) -> None:
        if self.hook is not None:
            self.hook(stage)


Finish = Callable[[Row, "list[int] | BaseException"], None]


def is_out_of_memory(exc: BaseException) -> bool:
    """MLX's allocation failures: MemoryError on the CPU, RuntimeError naming malloc elsewhere."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


def check_limits(**limits: int) -> None:
    """Every limit at least 1: a zero limit would never admit a row, and the stream would stall."""
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")


def pack(sizes: list[int], *, max_padded: int, slack: float, max_count: int | None = None) -> list[list[int]]:
    """Indices of ``sizes`` in groups padded to their longest member, for one batched call.

    Shortest first; a group closes when adding the next size would make it hold more than
    ``max_padded`` padded elements, more than ``max_count`` members, or more than ``slack``
    times the elements it really has (padding is computed for nothing).
    """
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        group = groups[-1] if groups else None
        if group is not None:
            padded = (len(group) + 1) * sizes[i]
            if (padded <= max_padded and padded <= slack * (real + sizes[i])
                    and (max_count is None or len(group) < max_count)):
                group.append(i)
                real += sizes[i]
                continue
        groups.append([i])
        real = sizes[i]
    return groups


class Scheduler:
    def __init__(self, decoder: Decoder, *, max_rows: int, max_batch_tokens: int, prefill_tokens: int,
                 padding_slack: float):
        check_limits(max_rows=max_rows, max_batch_tokens=max_batch_tokens, prefill_tokens=prefill_tokens)
        self.decoder = decoder
        self.padding_slack = padding_slack
        self.max_rows = max_rows
        self.rows_limit = max_rows  # the limit asked for; max_rows is lowered under it when memory runs out
        self.clean_steps = 0  # decode steps since max_rows last changed
        self.recovery_steps = RECOVERY_STEPS  # clean steps before it is raised again
        self.raised = False  # it was raised since it was last lowered
        self.max_batch_tokens = max_batch_tokens
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Row] = deque()
        self.rows: list[Row | None] = []  # the batch's rows in cache order; None: a hole
        self.batch: KVBatch | None = None
        self.token: mx.array | None = None  # the next input of every running row, not yet read
        # totals for benchmarks, logs and callers: seconds in prefill and decode, rows, prefill calls, steps, tokens read
        # peak_cache_tokens: the most rows x columns the KV cache held (holes included); placed: rows that
        # joined into holes; appends / compactions: joins and hole drops that copied the whole cache;
        # decode_wait: the part of decode spent waiting for the device's tokens (the rest is the host's)
        self.stats: dict[str, float] = dict(prefill=0.0, decode=0.0, decode_wait=0.0, rows=0, prefills=0,
                                            tokens=0, steps=0, peak_rows=0, peak_cache_tokens=0, out_of_memory=0,
                                            placed=0, appends=0, compactions=0)

    @property
    def running(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    def free(self) -> int:
        """Rows the batch could take now, counting the waiting ones as taken (holes are not rows)."""
        running = self.running
        room = self.max_rows - len(running) - len(self.waiting)
        if running:
            widest = max(r.reserve for r in running)
            room = min(room, self.max_batch_tokens // widest - len(running) - len(self.waiting))
        return max(room, 0)

    def run(self, feed: Callable[[int], list[Row] | None], finish: Finish) -> None:
        """Until ``feed`` gives nothing (None) and no row waits or runs.

        ``feed(free)`` returns the rows it made of up to ``free`` new requests ([] when all
        of them failed before becoming rows), or None when it had no request. It is called
        before every step, with ``free`` 0 too while the batch is full, so that its caller
        can prepare the next requests (a worker fetching the next jobs' audio) meanwhile.
        """
        while True:
            free = self.free()
            fed = feed(free)
            self.waiting.extend(fed or [])
            self._admit(finish)
            if self.batch is None:
                if fed is None and not self.waiting:
                    return
                continue
            self._step(finish)

    # -- joining ------------------------------------------------------------------------

    def _admit(self, finish: Finish) -> None:
        """Move waiting rows that fit into the batch, prefilled in groups."""
        chosen: list[Row] = []
        running = self.running
        while self.waiting and len(running) + len(chosen) < self.max_rows:
            row = self.waiting[0]
            count = len(running) + len(chosen) + 1
            widest = max([row.reserve] + [r.reserve for r in running + chosen])
            if count > 1 and count * widest > self.max_batch_tokens:
                break
            chosen.append(self.waiting.popleft())
        for group in self._groups(chosen):
            self._prefill(group, finish)

    def _groups(self, rows: list[Row]) -> list[list[Row]]:
        widths = [len(r.ids) + len(r.tokens) for r in rows]
        groups = pack(widths, max_padded=self.prefill_tokens, slack=self.padding_slack)
        return [[rows[i] for i in group] for group in groups]

    def _prefill(self, group: list[Row], finish: Finish) -> None:
        live = []
        for row in group:
            try:
                row.check("prefill")
                live.append(row)
            except Exception as exc:
                finish(row, exc)
        if live:
            self._prefill_checked(live, finish)

    def _prefill_checked(self, live: list[Row], finish: Finish) -> None:
        started = time.perf_counter()
        try:
            logits, batch = self.decoder.prefill([r.ids for r in live], [r.audio for r in live],
                                                 [r.tokens for r in live])
            first = mx.argmax(logits, axis=-1)
            mx.eval(first, [c.state[:2] for c in batch.caches])
        except Exception as exc:  # out of memory, or one row the model refuses: halve until it is alone
            if is_out_of_memory(exc):
                mx.clear_cache()
                self.stats["out_of_memory"] += 1
                if len(live) == 1 and self.running:  # alone in its group, not on the device: it waits
                    self._wait_for_room(live[0])
                    return
                exc = AudioqError(FailureCode.MODEL_ERROR, f"out of device memory prefilling one prompt "
                                  f"of {len(live[0].ids)} tokens alone: {exc}")
            if len(live) == 1:
                finish(live[0], exc)
                return
            half = len(live) // 2
            self._prefill_checked(live[:half], finish)
            self._prefill_checked(live[half:], finish)
            return
        seconds = time.perf_counter() - started
        self.stats["prefill"] += seconds
        self.stats["prefills"] += 1
        self.stats["rows"] += len(live)
        for row in live:
            row.timings["prefill"] = row.timings.get("prefill", 0.0) + seconds
            row.joined = row.joined or time.perf_counter()
        self._join(live, first, batch, finish)

    def _wait_for_room(self, row: Row) -> None:
        """A row whose prefill did not fit beside the running rows waits, first in line, until one of them has
        left (no more rows than run now are admitted): it fails only if it does not fit with none."""
        self.waiting.appendleft(row)
        self._lower_rows(min(self.max_rows, len(self.running)))

    def _join(self, live: list[Row], first: mx.array, batch: KVBatch, finish: Finish) -> None:
        """Prefilled rows join the running batch: into holes where they fit, appended otherwise."""
        ready = [j for j, r in enumerate(live) if r.budget > len(r.tokens)]
        for j, row in enumerate(live):
            if j not in ready:
                finish(row, row.tokens)
        if self.batch is not None:
            ready = self._place(live, ready, first, batch)
        if not ready:
            return
        if len(ready) < len(live):
            batch.keep(ready)
            first = first[mx.array(ready)]
            live = [live[j] for j in ready]
        if self.batch is None:
            self.rows, self.batch, self.token = live, batch, first
            return
        self._compact()  # extending copies the whole cache anyway: the holes left go now
        self.batch.extend(batch)
        self.stats["appends"] += 1
        self.rows = self.rows + live
        self.token = mx.concatenate([self.token, first])

    def _place(self, live: list[Row], ready: list[int], first: mx.array, batch: KVBatch) -> list[int]:
        """Write ready rows into holes, each no longer than the running batch's columns; returns the rest.

        The holes left stay in the cache, whose columns grow to the widest row's reserve: when
        that would pass the memory budget, nothing is placed (the rows are appended, after
        the holes are dropped)."""
        holes = [i for i, row in enumerate(self.rows) if row is None]
        lengths = batch.lengths()
        fitting = [j for j in ready if lengths[j] <= self.batch.columns]
        pairs = list(zip(holes, fitting))
        if not pairs:
            return ready
        widest = max([r.reserve for r in self.running] + [live[j].reserve for _, j in pairs])
        if len(self.rows) * widest > self.max_batch_tokens:
            return ready
        self.batch.place(batch, pairs)
        targets, sources = (mx.array(side) for side in zip(*pairs))
        self.token[targets] = first[sources]
        for i, j in pairs:
            self.rows[i] = live[j]
        self.stats["placed"] += len(pairs)
        placed = {j for _, j in pairs}
        return [j for j in ready if j not in placed]

    # -- stepping -----------------------------------------------------------------------

    def _step(self, finish: Finish) -> None:
        started = time.perf_counter()
        left = []
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            try:
                row.check("generate")
            except Exception as exc:
                finish(row, exc)
                left.append(i)
        self._leave(left)
        if self.batch is None:
            return
        running = self.running
        try:
            following = None
            if any(len(r.tokens) + 1 < r.budget for r in running):
                following = mx.argmax(self.decoder.step(self.token, self.batch), axis=-1)
                mx.async_eval(following)
            waited = time.perf_counter()
            values = self.token.tolist()
            self.stats["decode_wait"] += time.perf_counter() - waited
        except Exception as exc:
            if not is_out_of_memory(exc):  # the step itself is broken: its rows fail, the stream goes on
                self._clear()
                for row in running:
                    finish(row, exc)
                return
            if len(running) == 1:
                row = running[0]
                self._clear()
                mx.clear_cache()
                finish(row, AudioqError(FailureCode.MODEL_ERROR, "out of device memory decoding one row "
                                        f"of {len(row.ids) + len(row.tokens)} tokens alone: {exc}"))
                return
            self.stats["out_of_memory"] += 1
            self._requeue_all()
            return
        self.stats["steps"] += 1
        self._recover_rows()
        self.stats["tokens"] += len(running)
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(running))
        self.stats["peak_cache_tokens"] = max(self.stats["peak_cache_tokens"], self.batch.rows * self.batch.columns)
        left = []
        for i, (row, value) in enumerate(zip(self.rows, values)):
            if row is None:
                continue
            if value in row.stop:
                finish(row, row.tokens)
                left.append(i)
                continue
            row.tokens.append(value)
            if len(row.tokens) >= row.budget:
                finish(row, row.tokens)
                left.append(i)
        self.token = following
        self._leave(left)
        self.stats["decode"] += time.perf_counter() - started

    def _leave(self, indices: list[int]) -> None:
        """Rows ``indices`` are done: each leaves a hole. The batch goes when none runs; it compacts when
        half its rows are holes or a hole keeps columns that no running row needs."""
        for i in indices:
            self.rows[i] = None
        holes = self.rows.count(None)
        if holes == len(self.rows):
            self._clear()
            return
        pads = self.batch.pads
        needed = min(p for p, row in zip(pads, self.rows) if row is not None)
        if holes >= HOLES_SHARE * len(self.rows) or min(pads) < needed:
            self._compact()

    def _compact(self) -> None:
        """Drop the holes from the cache and the pending tokens."""
        kept = [i for i, row in enumerate(self.rows) if row is not None]
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in kept]
        self.batch.keep(kept)
        self.stats["compactions"] += 1
        if self.token is not None:
            self.token = self.token[mx.array(kept)]

    def _lower_rows(self, rows: int) -> None:
        if self.raised:  # raising it did not fit: memory is still short, so wait twice as long next time
            self.recovery_steps *= 2
        self.max_rows, self.clean_steps, self.raised = max(1, rows), 0, False

    def _recover_rows(self) -> None:
        """A lowered row limit doubles back towards the one asked for after ``recovery_steps`` clean steps:
        memory may have run out for a while (another program's), and a worker's stream can last all
        night. If it still does not fit, the next step or prefill lowers it again, failing nothing, and
        the next raise waits twice as long, so a lasting shortage costs fewer and fewer retries."""
        if self.max_rows < self.rows_limit:
            self.clean_steps += 1
            if self.clean_steps >= self.recovery_steps:
                self.max_rows, self.clean_steps, self.raised = min(self.rows_limit, 2 * self.max_rows), 0, True

    def _clear(self) -> None:
        self.rows, self.batch, self.token = [], None, None

    def _requeue_all(self) -> None:
        """A step did not fit: every running row waits again (first in line), half as many rows."""
        running = self.running
        self.waiting.extendleft(reversed(running))
        self._lower_rows(len(running) // 2)
        self._clear()
        mx.clear_cache()
