"""A one-line progress display for a terminal, redrawn in place with a carriage return.

It is only for people watching a terminal. The CLI creates one only when stderr is a
TTY, so logs and pipes never fill up with redraws. Redraws are throttled, because a bulk
enqueue reports progress thousands of times.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO


class ProgressLine:
    def __init__(self, stream: TextIO, total: int, label: str, min_interval: float = 0.1):
        self.stream = stream
        self.total = max(total, 0)
        self.label = label
        self.min_interval = min_interval
        self._last_draw = 0.0
        self._width = 0

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if now - self._last_draw < self.min_interval and done < self.total:
            return
        self._last_draw = now
        columns = shutil.get_terminal_size((80, 20)).columns
        fraction = done / self.total if self.total else 1.0
        bar_width = 24
        filled = int(bar_width * min(fraction, 1.0))
        text = f"{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] {done}/{self.total}"
        if note:
            text += f"  {note}"
        text = text[: max(columns - 1, 10)]
        padding = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + padding)
        self.stream.flush()

    def close(self) -> None:
        """Clear the line so that what follows starts on a clean line."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._width = 0
