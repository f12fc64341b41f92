"""Long recordings made on the spot for tests and benchmarks: espeak-ng speech with pauses
at known places, over a steady room-tone noise so that no pause is digital silence."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from worker.audio import SAMPLE_RATE

SENTENCES = (
    "The committee met on Tuesday to discuss the budget for the coming year",
    "Everyone agreed that the old printers should be replaced before the winter",
    "The auditors will finish their review of the accounts by the end of the month",
    "Our new office in the north of the city opens to visitors next spring",
    "Please send the revised figures to every member of the board before Friday",
    "The train to the coast leaves from platform nine at twenty past seven",
    "She thanked the volunteers who had painted the school during the holidays",
    "A short walk along the river brings you to the market and the old bridge",
    "The museum keeps its doors open late on the first Thursday of every month",
    "He explained how the water pumps were repaired after the storm last year",
    "The library has ordered more copies of the books that students asked for",
    "We will meet again in two weeks to hear what the engineers have found",
)
NOISE_DBFS = -50.0  # room tone: well above the plan's absolute floor, well below speech
SPEECH_EDGE = 1e-3  # what counts as the start and end of a spoken sentence


@dataclass(frozen=True)
class Recording:
    """16 kHz mono float32 ``samples``; ``pauses`` are the (start, end) sample spans between
    sentences, where nothing is said."""

    samples: np.ndarray
    pauses: tuple[tuple[int, int], ...]

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


def spoken(text: str) -> np.ndarray:
    """``text`` read by espeak-ng, 16 kHz mono float32, trimmed to the first and last sound."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        data, rate = sf.read(wav, dtype="float32")
    samples = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > SPEECH_EDGE)
    return samples[loud[0]:loud[-1] + 1]


def speech_with_pauses(pause_seconds, seed: int = 0) -> Recording:
    """Sentences (``SENTENCES``, cycled) with ``pause_seconds[i]`` of room tone after sentence i,
    so there are ``len(pause_seconds)`` pauses and one more sentence than pauses."""
    pieces, pauses, pos = [], [], 0
    sentences = [spoken(text) for text in SENTENCES]
    for i in range(len(pause_seconds) + 1):
        speech = sentences[i % len(sentences)]
        pieces.append(speech)
        pos += speech.size
        if i < len(pause_seconds):
            gap = int(pause_seconds[i] * SAMPLE_RATE)
            pieces.append(np.zeros(gap, np.float32))
            pauses.append((pos, pos + gap))
            pos += gap
    samples = np.concatenate(pieces)
    rng = np.random.default_rng(seed)
    samples += (10 ** (NOISE_DBFS / 20) * rng.standard_normal(samples.size)).astype(np.float32)
    return Recording(samples, tuple(pauses))


def write_blockwise(path, seconds: float, block, rate: int, channels: int = 1, **kwargs) -> None:
    """Write ``seconds`` of audio made by ``block(i, frames) -> [frames, channels]`` one second at a time,
    so hours of audio never exist in memory at once."""
    with sf.SoundFile(path, "w", rate, channels, **kwargs) as f:
        for i in range(int(np.ceil(seconds))):
            frames = min(rate, int(round(seconds * rate)) - i * rate)
            f.write(block(i, frames))
