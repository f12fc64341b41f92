"""Where a long recording is cut into clips the model can take, and which silences it skips.

Pure and deterministic (numpy only): the same samples and options give the same plan, which
is what lets a requeued job resume at its first unfinished chunk. The rules and their why are
in docs/design.md, "Long audio: the chunk plan".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.audio import MIN_SAMPLES, SAMPLE_RATE

MODEL_WINDOW_SECONDS = 30.0  # the longest clip Gemma 4's audio tower takes
FRAME = SAMPLE_RATE // 50  # 20 ms energy frames
SMOOTH_FRAMES = 5  # levels are judged over 100 ms: one frame, centred
# A pause is quieter than the recording's quiet level (its 10th percentile) plus a margin,
# and well under its loud level (95th percentile), so a recording without pauses has none;
# anything under the absolute floor is a pause however quiet the whole recording is.
QUIET_PERCENTILE = 10
LOUD_PERCENTILE = 95
QUIET_MARGIN_DB = 6.0
LOUD_CONTRAST_DB = 20.0
SILENCE_FLOOR_DB = -60.0  # dBFS of a 100 ms mean square
# Where no pause falls inside a window, the cut is the quietest 100 ms of its last seconds.
FALLBACK_SECONDS = 2.0
# A skipped silence leaves this much of itself on each side of the sound it borders (at most
# a quarter of the shortest skipped span), so soft onsets and decays stay in the chunks.
EDGE_SECONDS = 0.25
_TINY = 1e-12  # mean-square floor before the log: digital silence is -120 dBFS


@dataclass(frozen=True)
class Chunk:
    """One clip of the recording: samples ``[start, end)`` at 16 kHz."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks in order, non-overlapping; skipped silences are covered by none."""

    chunks: tuple[Chunk, ...]
    total_samples: int
    speech_seconds: float  # seconds covered by chunks


def plan_chunks(samples: np.ndarray, *, max_chunk_seconds: float = MODEL_WINDOW_SECONDS,
                skip_silence_seconds: float = 3.0, min_chunk_seconds: float = 3.0,
                silence_floor_db: float = SILENCE_FLOOR_DB) -> ChunkPlan:
    """Cut 16 kHz mono ``samples`` at pauses into chunks of at most ``max_chunk_seconds``.

    Pauses of at least ``skip_silence_seconds`` are left out; inside the sound between them
    every chunk is at least ``min_chunk_seconds`` long unless the sound itself is shorter.
    """
    if not 0 < max_chunk_seconds <= MODEL_WINDOW_SECONDS:
        raise ValueError(f"max_chunk_seconds must be in (0, {MODEL_WINDOW_SECONDS:g}], not {max_chunk_seconds}")
    if not 0 < min_chunk_seconds <= max_chunk_seconds / 2:
        raise ValueError(f"min_chunk_seconds must be in (0, max_chunk_seconds / 2], not {min_chunk_seconds}")
    if skip_silence_seconds <= 0:
        raise ValueError(f"skip_silence_seconds must be positive, not {skip_silence_seconds}")
    total = int(samples.size)
    energy = frame_energy(samples)
    levels = smoothed_levels(energy)
    quiet = levels < pause_threshold(levels, silence_floor_db)
    starts, ends = runs(quiet)
    skip = (ends - starts) * FRAME >= skip_silence_seconds * SAMPLE_RATE
    spans = sounding_spans(starts[skip], ends[skip], total, min(EDGE_SECONDS, skip_silence_seconds / 4))
    splitter = _Splitter(energy, levels, starts[~skip], ends[~skip], int(max_chunk_seconds * SAMPLE_RATE),
                         int(min_chunk_seconds * SAMPLE_RATE))
    chunks = tuple(chunk for a, b in spans for chunk in splitter.split(a, b) if chunk.size >= MIN_SAMPLES)
    return ChunkPlan(chunks, total, sum(chunk.size for chunk in chunks) / SAMPLE_RATE)


def frame_energy(samples: np.ndarray) -> np.ndarray:
    """Mean square of each 20 ms frame (the last one may be shorter), float64 ``[ceil(n / FRAME)]``."""
    whole = samples.size // FRAME
    frames = samples[:whole * FRAME].reshape(whole, FRAME)
    energy = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / FRAME  # no n-sized temporary
    tail = samples[whole * FRAME:]
    if tail.size:
        energy = np.append(energy, np.dot(tail.astype(np.float64), tail) / tail.size)
    return energy


def smoothed_levels(energy: np.ndarray) -> np.ndarray:
    """dBFS of the mean square over ``SMOOTH_FRAMES`` frames centred on each frame (fewer at the ends)."""
    half = SMOOTH_FRAMES // 2
    summed = np.concatenate(([0.0], np.cumsum(energy)))
    lo = np.maximum(np.arange(energy.size) - half, 0)
    hi = np.minimum(np.arange(energy.size) + half + 1, energy.size)
    return 10 * np.log10((summed[hi] - summed[lo]) / (hi - lo) + _TINY)


def pause_threshold(levels: np.ndarray, floor_db: float) -> float:
    """The level under which a 100 ms frame is a pause, adapted to this recording (dBFS)."""
    if levels.size == 0:
        return floor_db
    quiet, loud = np.percentile(levels, [QUIET_PERCENTILE, LOUD_PERCENTILE])
    return max(floor_db, min(quiet + QUIET_MARGIN_DB, loud - LOUD_CONTRAST_DB))


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of True in ``mask``, ends exclusive."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def sounding_spans(starts: np.ndarray, ends: np.ndarray, total: int, edge_seconds: float) -> list[tuple[int, int]]:
    """Sample spans between the skipped silences (frame runs ``starts``–``ends``), each keeping
    ``edge_seconds`` of the silence beside it."""
    edge = int(edge_seconds * SAMPLE_RATE)
    spans, pos = [], 0
    for start, end in zip((starts * FRAME).tolist(), np.minimum(ends * FRAME, total).tolist()):
        cut_from = start + edge if start > 0 else 0
        if cut_from > pos:
            spans.append((pos, cut_from))
        pos = end - edge if end < total else total
    if pos < total:
        spans.append((pos, total))
    return spans


class _Splitter:
    """Splits one sounding span into chunks, cutting inside the pauses (frame runs) it holds."""

    def __init__(self, energy, levels, pause_starts, pause_ends, max_samples: int, min_samples: int):
        self.energy, self.levels = energy, levels
        self.pause_starts, self.pause_ends = pause_starts, pause_ends
        self.max, self.min = max_samples, min_samples
        self.fallback = int(FALLBACK_SECONDS * SAMPLE_RATE)

    def split(self, a: int, b: int) -> list[Chunk]:
        chunks = []
        while b - a > self.max:
            # Both sides of the cut keep at least min_samples, so no tiny piece is left.
            lo, hi = a + self.min, min(a + self.max, b - self.min)
            cut = self.pause_cut(lo, hi, a + self.max // 2)
            if cut is None:
                cut = self.quietest_cut(max(lo, hi - self.fallback), hi)
            chunks.append(Chunk(a, cut))
            a = cut
        chunks.append(Chunk(a, b))
        return chunks

    def pause_cut(self, lo: int, hi: int, half: int) -> int | None:
        """The quietest frame of the longest pause within ``[lo, hi]`` (its part there), preferring
        pauses in the window's second half (from ``half``) and, among equals, the later; None: no pause."""
        for first in (max(lo, half), lo):
            f_lo, f_hi = _frame_after(first), _frame_before(hi)
            i0 = np.searchsorted(self.pause_ends, f_lo, side="right")
            i1 = np.searchsorted(self.pause_starts, f_hi, side="left")
            if f_hi > f_lo and i1 > i0:
                s = np.maximum(self.pause_starts[i0:i1], f_lo)
                e = np.minimum(self.pause_ends[i0:i1], f_hi)
                pick = len(s) - 1 - int(np.argmax((e - s)[::-1]))
                frame = s[pick] + int(np.argmin(self.energy[s[pick]:e[pick]]))
                return int(frame * FRAME + FRAME // 2)
        return None

    def quietest_cut(self, lo: int, hi: int) -> int:
        """The centre of the quietest 100 ms whose centre frame lies within ``[lo, hi]`` (vLLM's rule)."""
        f_lo, f_hi = _frame_after(lo), _frame_before(hi)
        if f_hi <= f_lo:
            return hi
        return int((f_lo + int(np.argmin(self.levels[f_lo:f_hi]))) * FRAME + FRAME // 2)


def _frame_after(sample: int) -> int:
    """The first frame whose centre is at or after ``sample``."""
    return -(-(sample - FRAME // 2) // FRAME)


def _frame_before(sample: int) -> int:
    """One past the last frame whose centre is at or before ``sample``."""
    return (sample - FRAME // 2) // FRAME + 1
