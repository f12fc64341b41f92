"""A job result rendered as a file: ``txt``, ``json``, ``srt`` or ``vtt``, chosen by ``get_writer``.

The producer renders these (``audioq results --format``) and so does the worker (the files it
writes to ``output_uri``, ``audioq transcribe --format``), so this module imports no MLX.
Subtitles are made of the result's segments, one chunk of the recording each. A cue holds at
most ``CUE_LINES`` lines of ``LINE_WIDTH`` characters; a segment whose text needs more becomes
consecutive cues that share its time span in proportion to their text. Those inner times are
estimates: Gemma 4 gives no word timestamps, only the chunk's bounds are known.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import srt
import webvtt

from producer.schema import JobResult, OutputFormat, Segment

LINE_WIDTH = 42
CUE_LINES = 2


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float
    lines: tuple[str, ...]


def cues(segments: list[Segment]) -> list[Cue]:
    """The subtitle cues of ``segments``, in order; empty segments make none."""
    found: list[Cue] = []
    for segment in segments:
        lines = textwrap.wrap(" ".join(segment.text.split()), LINE_WIDTH, break_long_words=True)
        groups = [tuple(lines[i:i + CUE_LINES]) for i in range(0, len(lines), CUE_LINES)]
        weights = [sum(map(len, group)) for group in groups]
        span, total, done = segment.end - segment.start, sum(weights), 0
        for group, weight in zip(groups, weights):
            start = segment.start + span * done / total
            done += weight
            found.append(Cue(round(start, 3), round(segment.start + span * done / total, 3), group))
    return found


def timestamp(seconds: float, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm``: SRT writes a comma, WebVTT a full stop."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}{decimal}{millis % 1000:03d}"


class Writer(Protocol):
    extension: str
    content_type: str

    def render(self, result: JobResult) -> str: ...


class WriteTXT:
    extension, content_type = "txt", "text/plain; charset=utf-8"

    def render(self, result: JobResult) -> str:
        return result.text + "\n"


class WriteJSON:
    extension, content_type = "json", "application/json"

    def render(self, result: JobResult) -> str:
        return result.model_dump_json(indent=2) + "\n"


class WriteSRT:
    extension, content_type = "srt", "application/x-subrip; charset=utf-8"

    def render(self, result: JobResult) -> str:
        subtitles = [srt.Subtitle(i, timedelta(seconds=cue.start), timedelta(seconds=cue.end), "\n".join(cue.lines))
                     for i, cue in enumerate(cues(result.segments), start=1)]
        return srt.compose(subtitles)


class WriteVTT:
    """WebVTT; ``&``, ``<`` and ``>`` are escaped, so cue text can hold neither tags nor ``-->``."""

    extension, content_type = "vtt", "text/vtt; charset=utf-8"

    def render(self, result: JobResult) -> str:
        captions = [webvtt.Caption(timestamp(cue.start, "."), timestamp(cue.end, "."),
                                   [html.escape(line, quote=False) for line in cue.lines])
                    for cue in cues(result.segments)]
        return webvtt.WebVTT(captions=captions).content


WRITERS: dict[str, Writer] = {writer.extension: writer for writer in (WriteTXT(), WriteJSON(), WriteSRT(), WriteVTT())}


def get_writer(output_format: OutputFormat) -> Writer:
    return WRITERS[output_format]
