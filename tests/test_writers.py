"""Result files: every format rendered by producer/writers.py and read back by a real parser
(json by pydantic, SRT by ``srt``, WebVTT by ``webvtt-py``)."""

from __future__ import annotations

import html
import io
import re
from datetime import timedelta

import pytest
import srt
import webvtt

from producer.schema import JobResult, Segment
from producer.writers import CUE_LINES, LINE_WIDTH, WRITERS, get_writer

LONG_TEXT = ("the committee met on tuesday to discuss the budget for the coming year and everyone agreed "
             "that the old printers should be replaced before the winter comes to the city")


def result(*segments: Segment, text: str | None = None) -> JobResult:
    return JobResult(text=" ".join(s.text for s in segments) if text is None else text, segments=list(segments),
                     model="m", audio_seconds=7300.0, timings={}, worker="w", tokens=3, audio_tokens=9,
                     chunks=len(segments), speech_seconds=12.5)


SPEECH = result(Segment(start=1.5, end=4.25, text="hello there"),
                Segment(start=3725.004, end=3729.5, text="a & b <i>not a tag</i> --> an arrow"),
                Segment(start=3729.5, end=3750.0, text=LONG_TEXT))


def vtt_cues(text: str):
    return webvtt.from_buffer(io.StringIO(text))


def test_every_format_is_in_the_table_with_its_extension():
    assert set(WRITERS) == {"txt", "json", "srt", "vtt"}
    assert all(get_writer(name).extension == name for name in WRITERS)


def test_txt_is_the_text_and_a_newline():
    assert get_writer("txt").render(SPEECH) == SPEECH.text + "\n"


def test_json_is_the_whole_result():
    assert JobResult.model_validate_json(get_writer("json").render(SPEECH)) == SPEECH


def test_srt_cues_count_from_one_with_comma_millisecond_times():
    rendered = get_writer("srt").render(SPEECH)
    cues = list(srt.parse(rendered))
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    assert cues[0].start == timedelta(seconds=1.5) and cues[0].end == timedelta(seconds=4.25)
    assert "01:02:05,004 --> 01:02:09,500" in rendered  # HH:MM:SS,mmm past the first hour
    assert cues[1].content == "a & b <i>not a tag</i> --> an arrow"


def test_vtt_has_its_header_full_stop_times_and_escaped_text():
    rendered = get_writer("vtt").render(SPEECH)
    assert rendered.startswith("WEBVTT\n\n")
    cues = vtt_cues(rendered)
    assert (cues[1].start, cues[1].end) == ("01:02:05.004", "01:02:09.500")
    raw = cues[1].text
    assert "<" not in raw and "-->" not in raw and "&amp;" in raw
    assert html.unescape(raw) == "a & b <i>not a tag</i> --> an arrow"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_cue_lines_are_wrapped_and_a_long_segment_becomes_consecutive_cues(fmt):
    rendered = get_writer(fmt).render(SPEECH)
    texts = [c.content for c in srt.parse(rendered)] if fmt == "srt" else [c.text for c in vtt_cues(rendered)]
    for text in texts:
        lines = text.split("\n")
        assert len(lines) <= CUE_LINES and all(len(html.unescape(line)) <= LINE_WIDTH for line in lines)
    long_cues = texts[2:]
    assert len(long_cues) > 1  # the long segment needed more than two lines
    assert " ".join(" ".join(t.split("\n")) for t in long_cues) == LONG_TEXT  # nothing lost or reordered


def _seconds(stamp: str) -> float:
    h, m, s = re.split("[:]", stamp.replace(",", "."))
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_a_split_segment_shares_its_time_span_in_proportion_to_the_text():
    cues = list(vtt_cues(get_writer("vtt").render(SPEECH)))[2:]
    spans = [(_seconds(c.start), _seconds(c.end)) for c in cues]
    assert spans[0][0] == 3729.5 and spans[-1][1] == 3750.0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # consecutive, no gap, no overlap
    characters = [len(c.text.replace("\n", "")) for c in cues]
    for (start, end), n in zip(spans, characters):
        assert end - start == pytest.approx(20.5 * n / sum(characters), abs=0.002)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_no_segments_make_an_empty_but_valid_file(fmt):
    silent = result(text="")
    rendered = get_writer(fmt).render(silent)
    assert (list(srt.parse(rendered)) if fmt == "srt" else list(vtt_cues(rendered))) == []


def test_segments_with_empty_text_make_no_cue():
    rendered = get_writer("srt").render(result(Segment(start=0, end=2, text=""), Segment(start=2, end=3, text="hi")))
    assert [(c.index, c.content) for c in srt.parse(rendered)] == [(1, "hi")]
