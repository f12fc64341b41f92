"""Damaged and hostile audio through a real burst worker: each job ends with its precise code and
one plain sentence, the log holds one line per refusal and no traceback, and the worker goes on."""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import make_tone
from worker_fixtures import enqueue, failure_code, fetch, run_burst, worker_settings, write_wav

from producer import record


def wav_with_rate(path, rate: int):
    """A canonical 16-bit mono WAV whose header claims ``rate``."""
    data = bytes(32_000)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)
    return path


def piped_flac(tmp_path, name: str, seconds: float):
    source = write_wav(tmp_path / f"{name}.wav", make_tone(seconds))
    subprocess.run(f"ffmpeg -loglevel error -i {source} -f flac pipe:1 > {tmp_path / name}", shell=True, check=True)
    return tmp_path / name


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_damaged_audio_jobs_fail_precisely_without_tracebacks(redis_url, redis_conn, engine, tmp_path, caplog):
    rng = np.random.default_rng(0)
    (tmp_path / "noise.mp3").write_bytes(b"\xff\xfb\x90\x64" + rng.integers(0, 256, 9000, dtype=np.uint8).tobytes())
    whole = write_wav(tmp_path / "whole.wav", make_tone(4.0))
    (tmp_path / "cut.wav").write_bytes(whole.read_bytes()[:64_044])
    nan = make_tone(1.0)
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16_000, subtype="FLOAT")
    bad = {
        "noise.mp3": "corrupt_audio", "zero_hz.wav": "corrupt_audio", "one_hz.wav": "corrupt_audio",
        "cut.wav": "corrupt_audio", "nan.wav": "corrupt_audio", "long_piped.flac": "audio_too_long",
    }
    wav_with_rate(tmp_path / "zero_hz.wav", 0)
    wav_with_rate(tmp_path / "one_hz.wav", 1)
    piped_flac(tmp_path, "long_piped.flac", 45.0)
    good = piped_flac(tmp_path, "short_piped.flac", 2.0)
    jobs = {name: enqueue(redis_conn, {"audio_uri": (tmp_path / name).as_uri()}) for name in bad}
    good_job = enqueue(redis_conn, {"audio_uri": good.as_uri()})
    with caplog.at_level(logging.INFO):
        run_burst(worker_settings(redis_url, max_audio_seconds=30.0), engine)  # long_piped.flac is over it
    for name, code in bad.items():
        job = fetch(redis_conn, jobs[name].id)
        message = job.get_meta()[record.META_FAILURE]["message"]
        assert (job.get_status(), failure_code(job)) == ("failed", code), (name, message)
        assert "\n" not in message and "SF_INFO" not in message and "possibly a pipe" not in message
        lines = [r for r in caplog.records if job.id in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(lines) == 1 and code in lines[0].getMessage()
    assert fetch(redis_conn, good_job.id).get_status() == "finished"
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records)
