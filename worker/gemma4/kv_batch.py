"""The KV caches of a batch of rows: left-padded, right-aligned, one column per position.

Every producer layer (sliding and full) gets an mlx-lm ``BatchKVCache``: its left padding,
per-row ``offset`` (each row's RoPE position), ``extend`` (right-justifies two batches of
different lengths) and ``filter`` (drops rows, then the columns every row pads) are exact.
Sliding layers do not use ``BatchRotatingKVCache``: its ring buffer keeps one write index
for all rows, and extending or merging rotated caches of different lengths is where
mlx-lm #983 lives. Because every row's newest key sits in the last column, the sliding
window is the same column range for every row: the last ``window`` columns. A decode step
of a sliding layer reads only those (``WindowCache``), and a mask does the rest of what the
ring does, exactly (docs/design.md, "Batching").

The masks are built here, once per layer type and step, from a host-side copy of the left
padding, so a step needs no device read.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

SLIDING = "sliding_attention"


class WindowCache(BatchKVCache):
    """A sliding layer's cache: a decode step gets only the window's columns back.

    The layer (and every KV-shared layer reading it) then attends over ``window`` columns,
    not over every column the batch holds; the columns before the window are invisible to a
    decode step's query anyway. Prefill chunks get every column: their earlier queries see
    earlier windows.
    """

    def __init__(self, pads: list[int], window: int):
        super().__init__(pads)
        self.window = window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys_all, values_all = super().update_and_fetch(keys, values)
        if keys.shape[2] == 1 and keys_all.shape[2] > self.window:
            return keys_all[..., -self.window:, :], values_all[..., -self.window:, :]
        return keys_all, values_all


class KVBatch:
    def __init__(self, layer_types: list[str], pads: list[int], window: int):
        self.caches = [WindowCache(pads, window) if kind == SLIDING and window else BatchKVCache(pads)
                       for kind in layer_types]
        self.pads = list(pads)  # leading columns of each row that hold no token
        self.window = window
        self.columns = 0

    @property
    def rows(self) -> int:
        return len(self.pads)

    def lengths(self) -> list[int]:
        """Tokens each row holds (its next RoPE position)."""
        return [self.columns - p for p in self.pads]

    def masks(self, new: int) -> dict[str, mx.array | str | None]:
        """Attention masks per layer type for ``new`` query columns appended after the cache.

        A key column is visible to a query column when it is not after it, is inside the
        window (sliding layers), and is not the row's left padding. A padding query also
        sees itself, so its softmax has one finite term (its output is never read). A decode
        step's query is the last column, so its mask is one threshold per row, over the
        columns the layer reads (a sliding layer: its window, ``WindowCache``): none at all
        when no row pads any of them.
        """
        total = self.columns + new
        out: dict[str, mx.array | str | None] = {}
        for kind, window in (("full_attention", None), (SLIDING, self.window)):
            if new == 1:  # a decode step: one threshold per row, computed on the host
                start = total - window if window and total > window else 0  # the first column read
                first = [max(p - start, 0) for p in self.pads]
                out[kind] = mx.arange(total - start) >= mx.array(first)[:, None, None, None] if any(first) else None
                continue
            if not any(self.pads) and (window is None or total <= window):
                out[kind] = "causal"
                continue
            q = mx.arange(self.columns, total)[:, None]
            k = mx.arange(total)[None]
            visible = k <= q
            if window is not None:
                visible = visible & (q - k < window)
            pads = mx.array(self.pads)[:, None, None, None]
            out[kind] = (visible & (k >= pads)) | (k == q)
        return out

    def advance(self, new: int) -> None:
        """Record that the layers appended ``new`` columns (called after a forward pass)."""
        self.columns += new

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); columns that are padding in every kept row go."""
        index = mx.array(rows)
        pads = [self.pads[r] for r in rows]
        cut = min(pads) if pads else 0
        for cache in self.caches:  # BatchKVCache.filter, without its device read of the padding
            keys, values, offset, left, used = cache.state
            if keys is not None:
                keys, values = keys[index, :, cut:], values[index, :, cut:]
            cache.state = keys, values, offset[index], left[index] - cut, used - cut
        self.pads = [p - cut for p in pads]
        self.columns -= cut

    def place(self, other: "KVBatch", pairs: list[tuple[int, int]]) -> None:
        """Write ``other``'s row j over this batch's row i, for each (i, j), right-aligned.

        Row i's old columns left of the new row become its padding (the mask hides them), so
        no other row moves: a slice for the keys and one for the values per row and layer,
        where ``extend`` copies every row of every layer. Row j may not be longer than this
        batch's columns.
        """
        for i, j in pairs:
            length = other.columns - other.pads[j]
            if length > self.columns:
                raise ValueError(f"a row of {length} columns cannot be placed in a batch of {self.columns}")
            self.pads[i] = self.columns - length
        for mine, theirs in zip(self.caches, other.caches):
            for i, j in pairs:
                target, source = slice(self.pads[i], self.columns), slice(other.pads[j], other.columns)
                mine.keys[i:i + 1, :, target] = theirs.keys[j:j + 1, :, source]
                mine.values[i:i + 1, :, target] = theirs.values[j:j + 1, :, source]
        for cache in self.caches:  # arrays of its own each: mlx-lm updates them in place (``+=``)
            cache.offset, cache.left_padding = mx.array(self.lengths()), mx.array(self.pads)

    def extend(self, other: "KVBatch") -> None:
        """Append ``other``'s rows; the shorter side is padded on the left."""
        for mine, theirs in zip(self.caches, other.caches):
            mine.extend(theirs)
        width = max(self.columns, other.columns)
        self.pads = [p + width - self.columns for p in self.pads] + \
                    [p + width - other.columns for p in other.pads]
        self.columns = width

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)
