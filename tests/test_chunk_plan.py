"""plan_chunks on real recordings: espeak-ng speech with pauses at known places, hours of
silence, sound without any pause, and the same speech at other rates and channel counts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr
from recordings import speech_with_pauses, write_blockwise

from worker.audio import SAMPLE_RATE, decode_audio
from worker.chunk_plan import (EDGE_SECONDS, FALLBACK_SECONDS, FRAME, MODEL_WINDOW_SECONDS, frame_energy,
                               plan_chunks, smoothed_levels)

# Sentence pauses of 0.6–2.5 s after each of 23 sentences (~4.5 minutes), and one 40 s
# silence in the middle that the plan must skip.
PAUSES = (0.6, 1.2, 0.8, 2.5, 0.7, 1.5, 0.9, 2.0, 0.6, 1.1, 40.0, 0.8, 1.4, 0.7, 2.2, 0.9, 0.6, 1.8,
          1.0, 0.7, 2.4, 0.8)
LONG_SILENCE = PAUSES.index(40.0)


@pytest.fixture(scope="module")
def meeting():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    return speech_with_pauses(PAUSES)


def cuts(plan) -> list[int]:
    """Sample positions where one chunk ends and the next starts (not skipped silences)."""
    return [a.end for a, b in zip(plan.chunks, plan.chunks[1:]) if a.end == b.start]


def inside_a_pause(position: int, pauses, tolerance: int = 0) -> bool:
    return any(start - tolerance <= position <= end + tolerance for start, end in pauses)


def assert_well_formed(plan, max_seconds: float):
    assert plan.chunks, "speech must give chunks"
    for chunk in plan.chunks:
        assert 0 <= chunk.start < chunk.end <= plan.total_samples
        assert chunk.size <= max_seconds * SAMPLE_RATE
    assert all(a.end <= b.start for a, b in zip(plan.chunks, plan.chunks[1:]))
    assert plan.speech_seconds == pytest.approx(sum(c.size for c in plan.chunks) / SAMPLE_RATE)


# ------------------------------------------------------------------ speech with pauses
@pytest.mark.parametrize("max_seconds", [MODEL_WINDOW_SECONDS, 12.0])
def test_cuts_land_inside_the_known_pauses(meeting, max_seconds):
    plan = plan_chunks(meeting.samples, max_chunk_seconds=max_seconds)
    assert len(cuts(plan)) >= 4
    assert all(inside_a_pause(cut, meeting.pauses) for cut in cuts(plan)), cuts(plan)


@pytest.mark.parametrize("max_seconds", [MODEL_WINDOW_SECONDS, 12.0])
def test_chunks_are_ordered_inside_the_recording_and_within_the_limit(meeting, max_seconds):
    assert_well_formed(plan_chunks(meeting.samples, max_chunk_seconds=max_seconds), max_seconds)


def test_no_chunk_is_uselessly_short(meeting):
    plan = plan_chunks(meeting.samples, max_chunk_seconds=12.0, min_chunk_seconds=4.0)
    assert min(chunk.size for chunk in plan.chunks) >= 4.0 * SAMPLE_RATE


def test_a_long_silence_is_covered_by_no_chunk(meeting):
    start, end = meeting.pauses[LONG_SILENCE]
    plan = plan_chunks(meeting.samples, skip_silence_seconds=3.0)
    edge = int((EDGE_SECONDS + 0.1) * SAMPLE_RATE)  # the silence kept beside sound, plus one 100 ms level
    assert not any(c.start < end - edge and c.end > start + edge for c in plan.chunks)
    spoken = meeting.seconds - sum(e - s for s, e in meeting.pauses) / SAMPLE_RATE
    assert spoken < plan.speech_seconds < meeting.seconds - 39.0


def test_the_plan_is_deterministic(meeting):
    assert plan_chunks(meeting.samples) == plan_chunks(meeting.samples.copy())


def test_every_speech_sample_is_in_a_chunk(meeting):
    plan = plan_chunks(meeting.samples)
    covered = np.zeros(meeting.samples.size, bool)
    for chunk in plan.chunks:
        covered[chunk.start:chunk.end] = True
    spoken = np.ones(meeting.samples.size, bool)
    for start, end in meeting.pauses:
        spoken[start:end] = False
    assert covered[spoken].all()


# ------------------------------------------------------------------ other rates and channels
@pytest.mark.parametrize("rate,channels,fmt", [(48_000, 2, "FLAC"), (8_000, 1, "WAV")])
def test_speech_at_other_rates_is_cut_inside_the_same_pauses(tmp_path, meeting, rate, channels, fmt):
    source = soxr.resample(meeting.samples, SAMPLE_RATE, rate, quality="HQ")
    path = tmp_path / f"meeting.{fmt.lower()}"
    sf.write(path, np.repeat(source[:, None], channels, axis=1), rate, format=fmt, subtype="PCM_16")
    plan = plan_chunks(decode_audio(path))
    assert_well_formed(plan, MODEL_WINDOW_SECONDS)
    assert all(inside_a_pause(cut, meeting.pauses, tolerance=SAMPLE_RATE // 100) for cut in cuts(plan))


# ------------------------------------------------------------------ silence
def test_two_hours_of_silence_plan_no_chunks(tmp_path):
    path = tmp_path / "silence.flac"
    write_blockwise(path, 2 * 3600, lambda i, n: np.zeros((n, 1), np.int16), SAMPLE_RATE, subtype="PCM_16")
    assert path.stat().st_size < 2_000_000
    plan = plan_chunks(decode_audio(path, max_seconds=4 * 3600))
    assert plan.chunks == () and plan.speech_seconds == 0.0 and plan.total_samples == 2 * 3600 * SAMPLE_RATE


def test_quiet_room_tone_without_speech_plans_no_chunks():
    rng = np.random.default_rng(1)
    assert plan_chunks((1e-4 * rng.standard_normal(600 * SAMPLE_RATE)).astype(np.float32)).chunks == ()


def test_nothing_plans_nothing():
    plan = plan_chunks(np.zeros(0, np.float32))
    assert plan.chunks == () and plan.total_samples == 0 and plan.speech_seconds == 0.0


# ------------------------------------------------------------------ no pause at all
@pytest.fixture(scope="module")
def babble():
    """Ten minutes of noise whose loudness swings like syllables but never drops to a pause."""
    rng = np.random.default_rng(2)
    t = np.arange(600 * SAMPLE_RATE) / SAMPLE_RATE
    envelope = 0.6 + 0.3 * np.sin(2 * np.pi * 3.7 * t) + 0.1 * np.sin(2 * np.pi * 0.31 * t)
    return (0.2 * envelope * rng.standard_normal(t.size)).astype(np.float32)


def test_sound_without_pauses_is_cut_at_the_quietest_frame_near_each_window_end(babble):
    plan = plan_chunks(babble)
    assert_well_formed(plan, MODEL_WINDOW_SECONDS)
    levels = smoothed_levels(frame_energy(babble))
    for chunk in plan.chunks[:-1]:
        window_end = chunk.start + int(MODEL_WINDOW_SECONDS * SAMPLE_RATE)
        assert chunk.end >= window_end - FALLBACK_SECONDS * SAMPLE_RATE
        tail = levels[(window_end - int(FALLBACK_SECONDS * SAMPLE_RATE)) // FRAME:window_end // FRAME]
        assert levels[chunk.end // FRAME] == pytest.approx(tail.min())


def test_sound_without_pauses_is_not_cut_at_a_fixed_mark(babble):
    sizes = {chunk.size for chunk in plan_chunks(babble).chunks[:-1]}
    assert len(sizes) > 1 and all(size < MODEL_WINDOW_SECONDS * SAMPLE_RATE for size in sizes)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("options", [
    {"max_chunk_seconds": MODEL_WINDOW_SECONDS + 1}, {"max_chunk_seconds": 0},
    {"min_chunk_seconds": 20.0}, {"skip_silence_seconds": 0},
])
def test_options_outside_their_range_are_refused(options):
    with pytest.raises(ValueError):
        plan_chunks(np.zeros(SAMPLE_RATE, np.float32), **options)


def test_settings_refuse_chunk_options_the_plan_cannot_honour():
    from pydantic import ValidationError

    from producer.settings import Settings

    with pytest.raises(ValidationError, match="at most half of max_chunk_seconds"):
        Settings(max_chunk_seconds=10.0, min_chunk_seconds=6.0)
    with pytest.raises(ValidationError, match="max_chunk_seconds"):
        Settings(max_chunk_seconds=31.0)


def test_the_plan_defaults_are_the_settings_defaults():
    import inspect

    from producer.settings import Settings

    defaults = {name: p.default for name, p in inspect.signature(plan_chunks).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert defaults == {name: Settings.model_fields[name].default for name in defaults}
