"""When clips that arrive while a batch runs go in: together, so the tower and the prefill take them as groups.

A worker's prefetch hands clips to the engine as their audio becomes ready, often one or
two a step. Taken in at once, each arrival costs a tower call and a prefill of its own,
and both have a large fixed cost per call on a GPU: on the H200, 128 clips fed two a step
ran at 109 audio s per second against 588 fed at once (docs/benchmarks.md). ``Arrivals``
holds clips back while rows run until ``join_rows`` of them are waiting (or as many as
there is room for), or the first has waited ``join_wait`` seconds, which bounds how long a
new job (a high-priority one too) waits to join. With nothing running, clips go in at once.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Arrivals(Generic[T]):
    def __init__(self, join_rows: int = 1, join_wait: float = 0.0):
        if join_rows < 1 or join_wait < 0:
            raise ValueError(f"join_rows must be at least 1 and join_wait at least 0, not {join_rows}, {join_wait}")
        self.join_rows = join_rows
        self.join_wait = join_wait
        self.pending: list[T] = []
        self.since = 0.0  # perf_counter when the first pending item arrived

    def add(self, items: list[T]) -> None:
        if items and not self.pending:
            self.since = time.perf_counter()
        self.pending.extend(items)

    def take(self, running: bool, room: int) -> list[T]:
        """The pending items that go in now (see the module's docstring): while rows run, at most
        ``room``, and none until a group is ready or the first has waited ``join_wait``."""
        if not self.pending:
            return []
        if running:
            waited = time.perf_counter() - self.since
            if room <= 0 or (len(self.pending) < min(self.join_rows, room) and waited < self.join_wait):
                return []
            taken, self.pending = self.pending[:room], self.pending[room:]
        else:
            taken, self.pending = self.pending, []
        if self.pending:
            self.since = time.perf_counter()
        return taken
