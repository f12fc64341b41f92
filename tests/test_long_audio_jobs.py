"""Long recordings through a real burst worker and the real engine: one segment per chunk of the
plan, result files, progress by chunk, silence, limits, translation and questions over long audio.

The recording is espeak-ng speech with pauses at known places (``recordings.speech_with_pauses``):
47 s, planned into 8 chunks at ``max_chunk_seconds`` 8, two long pauses skipped. The tiny
random-weight checkpoint makes the text noise, but greedy decoding is deterministic, so what a
job returns for each chunk must equal what ``Engine.run`` gives for that chunk's samples.
"""

from __future__ import annotations

import html
import io
import shutil
import threading

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt
from recordings import speech_with_pauses
from worker_fixtures import enqueue, fetch, run_burst, worker_settings, write_wav

from producer import record
from producer.client import Client
from producer.schema import JobRequest, JobResult
from producer.writers import timestamp
from worker.audio import SAMPLE_RATE, decode_audio
from worker.chunk_plan import plan_chunks
from worker.gemma4.engine import ClipRequest
from worker.instructions import answer_instruction, instruction_for, split_translation, transcribe_instruction

CHUNK = {"max_chunk_seconds": 8.0, "min_chunk_seconds": 3.0}  # many chunks from a short recording
PAUSES = [0.7, 4.0, 0.7, 0.7, 6.0, 0.7, 0.7, 0.7]  # the 4 s and 6 s pauses are skipped
TOKENS = 4


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    recording = speech_with_pauses(PAUSES)
    return write_wav(tmp_path_factory.mktemp("talk") / "talk.wav", recording.samples, subtype="FLOAT"), recording


@pytest.fixture(scope="module")
def plan(talk):
    path, _ = talk
    return plan_chunks(decode_audio(path), **CHUNK)


def settings(redis_url, **overrides):
    return worker_settings(redis_url, **{**CHUNK, **overrides})


def run_jobs(redis_url, redis_conn, engine, *requests, **overrides) -> list:
    jobs = [enqueue(redis_conn, r, job_id=f"long-{i}") for i, r in enumerate(requests)]
    run_burst(settings(redis_url, **overrides), engine)
    return [fetch(redis_conn, job.id) for job in jobs]


def result_of(job) -> JobResult:
    assert job.get_status() == "finished", job.get_meta().get(record.META_FAILURE)
    return JobResult.model_validate(job.return_value())


def per_chunk(engine, path, plan, instruction: str, budget: int = TOKENS):
    samples = decode_audio(path)
    return engine.run([ClipRequest(samples[c.start:c.end], instruction, budget) for c in plan.chunks])


# ------------------------------------------------------------------ segments
def test_each_chunk_of_a_long_recording_is_one_timestamped_segment(redis_url, redis_conn, engine, talk, plan):
    path, recording = talk
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri(), "max_new_tokens": TOKENS})
    result = result_of(job)
    assert len(plan.chunks) == result.chunks == len(result.segments) == 8
    assert [(s.start, s.end) for s in result.segments] == [
        (round(c.start / SAMPLE_RATE, 3), round(c.end / SAMPLE_RATE, 3)) for c in plan.chunks]
    outputs = per_chunk(engine, path, plan, instruction_for(JobRequest(audio_uri=path.as_uri())))
    assert [s.text for s in result.segments] == [o.text for o in outputs]
    assert result.text == " ".join(o.text for o in outputs if o.text)
    assert result.tokens == sum(len(o.tokens) for o in outputs)
    assert result.audio_tokens == sum(o.audio_tokens for o in outputs)
    assert result.speech_seconds == pytest.approx(plan.speech_seconds, abs=0.001)
    assert result.speech_seconds < result.audio_seconds
    assert result.audio_seconds == pytest.approx(recording.seconds, abs=0.001) and result.resumed_chunks == 0


def test_segments_are_monotone_inside_the_recording_and_skip_the_long_pauses(redis_url, redis_conn, engine,
                                                                            talk):
    path, recording = talk
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri(), "max_new_tokens": 2})
    segments = result_of(job).segments
    bounds = [x for s in segments for x in (s.start, s.end)]
    assert bounds == sorted(bounds) and 0 <= bounds[0] and bounds[-1] <= recording.seconds
    assert all(0 < s.end - s.start <= CHUNK["max_chunk_seconds"] for s in segments)
    for i, seconds in enumerate(PAUSES):
        if seconds >= 3.0:  # skip_silence_seconds
            start, end = (x / SAMPLE_RATE for x in recording.pauses[i])
            middle = (start + end) / 2
            assert not any(s.start <= middle <= s.end for s in segments)


def test_a_job_writes_every_format_it_asks_for_and_each_parses(redis_url, redis_conn, engine, talk, tmp_path):
    path, _ = talk
    out = tmp_path / "out"
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri(), "max_new_tokens": TOKENS,
                                                      "output_uri": out.as_uri(),
                                                      "output_formats": ["srt", "vtt", "json", "txt"]})
    result = result_of(job)
    assert result.output_uris == [(out / f"{job.id}.{ext}").as_uri() for ext in ("srt", "vtt", "json", "txt")]
    stored = JobResult.model_validate_json((out / f"{job.id}.json").read_text())
    assert stored.model_dump(exclude={"timings"}) == result.model_dump(exclude={"timings"})
    assert (out / f"{job.id}.txt").read_text() == result.text + "\n"
    spoken = [s for s in result.segments if s.text.split()]
    subtitles = list(srt.parse((out / f"{job.id}.srt").read_text()))
    captions = webvtt.from_buffer(io.StringIO((out / f"{job.id}.vtt").read_text()))
    # Cue times are the segments' (split, when a segment needs more than two lines).
    assert subtitles[0].start.total_seconds() == spoken[0].start and captions[0].start == timestamp(spoken[0].start, ".")
    assert subtitles[-1].end.total_seconds() == spoken[-1].end and captions[-1].end == timestamp(spoken[-1].end, ".")
    assert " ".join(c.content.replace("\n", " ") for c in subtitles).split() == result.text.split()
    assert " ".join(html.unescape(c.text).replace("\n", " ") for c in captions).split() == result.text.split()


def test_a_job_asking_for_no_outputs_writes_the_default_json_and_txt(redis_url, redis_conn, engine, talk, tmp_path):
    path, _ = talk
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri(), "max_new_tokens": 1,
                                                      "output_uri": tmp_path.as_uri()})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [f"{job.id}.json", f"{job.id}.txt"]


def test_progress_counts_chunks_and_audio_seconds_as_the_job_runs(redis_url, redis_conn, engine, talk, plan):
    path, recording = talk
    job = enqueue(redis_conn, {"audio_uri": path.as_uri(), "max_new_tokens": 30})
    client, seen, running = Client(settings(redis_url), connection=redis_conn), [], True

    def watch():
        while running:
            progress = client.status(job.id).progress
            if progress is not None and progress.chunks is not None:
                seen.append(progress)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_burst(settings(redis_url), engine)
    running = False
    watcher.join(10)
    assert len({p.chunk for p in seen}) >= 3  # the watcher saw the job at several chunks
    assert {p.chunks for p in seen} == {len(plan.chunks)}
    done = [p.chunks_done for p in seen]
    seconds = [p.audio_seconds_done for p in seen]
    assert done == sorted(done) and seconds == sorted(seconds) and seconds[-1] <= recording.seconds
    assert all(p.chunk > p.chunks_done for p in seen)  # chunk i runs once the i-1 before it are done
    assert all(p.audio_seconds == pytest.approx(recording.seconds, abs=0.001) for p in seen)


# ------------------------------------------------------------------ silence and limits
def test_an_hour_of_silence_finishes_with_empty_text_and_no_segments(redis_url, redis_conn, engine, tmp_path):
    path = tmp_path / "silence.flac"
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(np.zeros(60 * SAMPLE_RATE, np.int16))
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri()})
    result = result_of(job)
    assert (result.text, result.segments, result.chunks, result.speech_seconds) == ("", [], 0, 0.0)
    assert result.tokens == result.audio_tokens == 0 and result.audio_seconds == 3600.0


def test_a_recording_planned_into_more_than_max_chunks_is_audio_too_long(redis_url, redis_conn, engine, talk):
    path, _ = talk
    (job,) = run_jobs(redis_url, redis_conn, engine, {"audio_uri": path.as_uri()}, max_chunks=5)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "audio_too_long"
    assert "8 chunks" in failure["message"] and "at most 5" in failure["message"] and "max_chunks" in failure["message"]


# ------------------------------------------------------------------ tasks
def test_translate_runs_per_chunk_and_keeps_transcript_and_translation_apart(redis_url, redis_conn, engine, talk,
                                                                            plan):
    path, _ = talk
    request = {"audio_uri": path.as_uri(), "task": "translate", "target_language": "French",
               "language": "English", "max_new_tokens": 12}
    (job,) = run_jobs(redis_url, redis_conn, engine, request)
    result = result_of(job)
    replies = per_chunk(engine, path, plan, instruction_for(JobRequest(**request)), 12)
    parts = [split_translation(o.text, "French") for o in replies]
    assert [(s.transcript, s.text) for s in result.segments] == parts
    assert result.text == " ".join(t for _, t in parts if t)
    assert result.transcript == " ".join(t for t, _ in parts if t)


def test_the_translation_prompt_is_googles_wording():
    request = JobRequest(audio_uri="file:///a.wav", task="translate", language="German", target_language="English")
    assert instruction_for(request) == (
        "Transcribe the following speech segment in German, then translate it into English.\n"
        "When formatting the answer, first output the transcription in German, then one newline, "
        "then output the string 'English: ', then the translation in English.")


@pytest.mark.parametrize("reply,parts", [
    ("Guten Morgen allerseits\nEnglish: Good morning everyone", ("Guten Morgen allerseits", "Good morning everyone")),
    ("Guten Morgen\nGood morning", ("Guten Morgen", "Good morning")),  # marker left out
    ("Good morning", ("", "Good morning")),  # no transcript line at all
])
def test_a_translation_reply_is_split_into_transcript_and_translation(reply, parts):
    assert split_translation(reply, "English") == parts


def test_a_question_about_long_audio_is_answered_over_its_timestamped_transcript(redis_url, redis_conn, engine,
                                                                                talk, plan):
    path, _ = talk
    question = "What was decided, and when?"
    asked, transcribed = run_jobs(redis_url, redis_conn, engine,
                                  {"audio_uri": path.as_uri(), "task": "prompt", "prompt": question,
                                   "max_new_tokens": 6},
                                  {"audio_uri": path.as_uri(), "max_new_tokens": 6})
    answer, transcript = result_of(asked), result_of(transcribed)
    assert answer.segments == transcript.segments and answer.chunks == len(plan.chunks)
    lines = [f"[{timestamp(s.start, '.')} - {timestamp(s.end, '.')}] {s.text}" for s in transcript.segments if s.text]
    (expected,) = engine.run([ClipRequest(None, answer_instruction(question, lines), 6)])
    assert expected.tokens and answer.text == expected.text != transcript.text
    assert answer.tokens == transcript.tokens + len(expected.tokens) and answer.audio_tokens == transcript.audio_tokens


def test_a_question_over_a_transcript_past_the_context_budget_fails_naming_both_numbers(redis_url, redis_conn,
                                                                                        engine, talk):
    path, _ = talk
    (job,) = run_jobs(redis_url, redis_conn, engine,
                      {"audio_uri": path.as_uri(), "task": "prompt", "prompt": "Summarise it.", "max_new_tokens": 2},
                      answer_context_tokens=60)
    failure = job.get_meta()[record.META_FAILURE]
    assert job.get_status() == "failed" and failure["code"] == "audio_too_long"
    tokens = int(failure["message"].split(" tokens")[0].rsplit(" ", 1)[1])
    assert tokens > 60 and "at most 60 are allowed (answer_context_tokens)" in failure["message"]


def test_a_question_about_audio_within_one_window_is_one_clip_over_all_of_it(redis_url, redis_conn, engine,
                                                                            tmp_path):
    path = write_wav(tmp_path / "short.wav", speech_with_pauses([4.0]).samples, subtype="FLOAT")  # 10.9 s, 2 chunks
    request = {"audio_uri": path.as_uri(), "task": "prompt", "prompt": "Who speaks?", "max_new_tokens": 5}
    (job,) = run_jobs(redis_url, redis_conn, engine, request)
    result = result_of(job)
    (expected,) = engine.run([ClipRequest(decode_audio(path), "Who speaks?", 5)])
    assert result.text == expected.text and result.chunks == 1
    assert [(s.start, s.end, s.text) for s in result.segments] == [(0.0, result.audio_seconds, expected.text)]


def test_transcription_uses_googles_asr_wording():
    assert transcribe_instruction("French").startswith(
        "Transcribe the following speech segment in French into French text.\n\n"
        "Follow these specific instructions for formatting the answer:\n"
        "* Only output the transcription, with no newlines.\n")
    assert transcribe_instruction(None).startswith("Transcribe the following speech segment in its original "
                                                   "language.\n\nFollow these specific instructions")
