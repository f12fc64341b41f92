"""decode_audio on real files: what decodes, and the failure code and message for what does not.

Unsupported containers are made with ffmpeg/sox (scripts/setup.sh installs both); the
tests that need them skip when the tools are missing.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import make_tone
from recordings import write_blockwise

from producer.failures import AudioqError, FailureCode
from worker.audio import MIN_SAMPLES, SAMPLE_RATE, decode_audio, sniff_container

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")


def fails_with(code: FailureCode, path, **kwargs) -> str:
    with pytest.raises(AudioqError) as info:
        decode_audio(path, **kwargs)
    assert info.value.code == code, info.value
    return info.value.message


@pytest.fixture
def speech_wav(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, make_tone(2.0, sr=22_050), 22_050, subtype="PCM_16")
    return path


def converted(src, dst, *extra) -> str:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), *extra, str(dst)], check=True)
    return dst


# ------------------------------------------------------------------ what decodes
@pytest.mark.parametrize("fmt,subtype,suffix", [
    ("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav"), ("FLAC", "PCM_24", "flac"),
    ("OGG", "VORBIS", "ogg"), ("OGG", "OPUS", "opus"), ("MP3", "MPEG_LAYER_III", "mp3"),
    ("AIFF", "PCM_16", "aiff"), ("CAF", "PCM_16", "caf"),
])
def test_supported_formats_decode_to_mono_16k_float32(tmp_path, fmt, subtype, suffix):
    rate = 48_000 if subtype == "OPUS" else 44_100
    path = tmp_path / f"stereo.{suffix}"
    sf.write(path, make_tone(1.5, sr=rate, channels=2), rate, format=fmt, subtype=subtype)
    samples = decode_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size / SAMPLE_RATE - 1.5) < 0.1
    assert 0.1 < np.abs(samples).max() <= 1.0


def test_stereo_is_mixed_to_the_channel_mean(tmp_path):
    left = make_tone(1.0)[:, 0]
    path = tmp_path / "lr.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(path), left / 2, atol=1e-6)


@needs_ffmpeg
@pytest.mark.parametrize("name,extra", [
    ("cbr.mp3", ["-b:a", "64k"]), ("vbr.mp3", ["-q:a", "4"]), ("noxing.mp3", ["-write_xing", "0"]),
])
def test_healthy_mp3s_with_encoder_padding_are_not_called_truncated(tmp_path, speech_wav, name, extra):
    samples = decode_audio(converted(speech_wav, tmp_path / name, *extra))
    assert abs(samples.size / SAMPLE_RATE - 2.0) < 0.1


@needs_sox
def test_sox_mp3_without_xing_header_decodes(tmp_path, speech_wav):
    subprocess.run(["sox", str(speech_wav), str(tmp_path / "sox.mp3")], check=True)
    assert abs(decode_audio(tmp_path / "sox.mp3").size / SAMPLE_RATE - 2.0) < 0.1


@needs_ffmpeg
def test_streamed_wav_with_placeholder_sizes_decodes(tmp_path, speech_wav):
    with open(tmp_path / "piped.wav", "wb") as out:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(speech_wav), "-f", "wav", "-"],
                       stdout=out, check=True)
    assert abs(decode_audio(tmp_path / "piped.wav").size / SAMPLE_RATE - 2.0) < 0.01


# ------------------------------------------------------------------ unsupported_format
@needs_ffmpeg
@pytest.mark.parametrize("name,extra,container", [
    ("a.m4a", ["-c:a", "aac"], "MP4/M4A"),
    ("a.aac", ["-c:a", "aac", "-f", "adts"], "AAC (ADTS)"),
    ("a.webm", ["-c:a", "libopus"], "WebM/Matroska"),
    ("a.wma", ["-c:a", "wmav2"], "ASF (WMA)"),
])
def test_unsupported_containers_are_named_with_the_supported_list(tmp_path, speech_wav, name, extra, container):
    message = fails_with(FailureCode.UNSUPPORTED_FORMAT, converted(speech_wav, tmp_path / name, *extra))
    assert container in message and "wav, flac, ogg" in message


@needs_sox
def test_amr_is_named(tmp_path, speech_wav):
    subprocess.run(["sox", str(speech_wav), "-r", "8000", str(tmp_path / "a.amr-nb")], check=True)
    assert "AMR" in fails_with(FailureCode.UNSUPPORTED_FORMAT, tmp_path / "a.amr-nb")


@pytest.mark.parametrize("name", ["notes.wav", "notes.mp3", "notes.flac", "notes"])
def test_a_text_file_is_not_audio(tmp_path, name):
    (tmp_path / name).write_text("hello, this is not audio\n" * 20)
    message = fails_with(FailureCode.UNSUPPORTED_FORMAT, tmp_path / name)
    assert "not a recognised audio file" in message and "hello" not in message


def test_mp3_frames_are_not_mistaken_for_adts():
    assert sniff_container(b"\xff\xfb\x90\x64" + bytes(12)) is None
    assert sniff_container(b"\xff\xf1\x5c\x40" + bytes(12)) == "AAC (ADTS)"


# ------------------------------------------------------------------ corrupt_audio
@pytest.mark.parametrize("fmt,subtype,suffix,keep", [
    ("WAV", "PCM_16", "wav", 0.5), ("WAV", "FLOAT", "wav", 0.9), ("FLAC", "PCM_16", "flac", 0.5),
    ("MP3", "MPEG_LAYER_III", "mp3", 0.5), ("OGG", "VORBIS", "ogg", 0.5), ("AIFF", "PCM_16", "aiff", 0.5),
])
def test_truncated_files_are_corrupt(tmp_path, fmt, subtype, suffix, keep):
    path = tmp_path / f"whole.{suffix}"
    sf.write(path, make_tone(4.0, sr=22_050), 22_050, format=fmt, subtype=subtype)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[:int(len(data) * keep)])
    message = fails_with(FailureCode.CORRUPT_AUDIO, cut)
    assert "truncated" in message or "decode" in message


def test_truncated_wav_message_says_announced_and_found(tmp_path):
    path = tmp_path / "whole.wav"
    sf.write(path, make_tone(4.0), SAMPLE_RATE, subtype="PCM_16")
    (tmp_path / "cut.wav").write_bytes(path.read_bytes()[:64_044])  # header + 2.0 s
    assert "announces 4.00 s, it holds 2.00 s" in fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "cut.wav")


def test_nan_samples_in_a_float_wav_are_corrupt(tmp_path):
    samples = make_tone(1.0)
    samples[100:103] = np.nan
    samples[200] = np.inf
    sf.write(tmp_path / "nan.wav", samples, SAMPLE_RATE, subtype="FLOAT")
    assert "4 NaN or infinite samples" in fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "nan.wav")


# ------------------------------------------------------------------ empty_audio
def test_zero_byte_file_is_empty(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "0 bytes" in fails_with(FailureCode.EMPTY_AUDIO, tmp_path / "empty.wav")


def test_wav_with_zero_frames_is_empty(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), SAMPLE_RATE)
    assert "no audio samples" in fails_with(FailureCode.EMPTY_AUDIO, tmp_path / "zero.wav")


def test_a_few_samples_are_too_short_for_one_audio_token(tmp_path):
    sf.write(tmp_path / "short.wav", make_tone(1.0)[:MIN_SAMPLES - 1], SAMPLE_RATE)
    message = fails_with(FailureCode.EMPTY_AUDIO, tmp_path / "short.wav")
    assert "160 samples" in message and "at least 161" in message
    sf.write(tmp_path / "enough.wav", make_tone(1.0)[:MIN_SAMPLES], SAMPLE_RATE)
    assert decode_audio(tmp_path / "enough.wav").size == MIN_SAMPLES


def test_min_samples_is_the_front_ends_one_token_threshold():
    from worker.gemma4.features import audio_token_count

    assert audio_token_count(MIN_SAMPLES) == 1 and audio_token_count(MIN_SAMPLES - 1) == 0


# ------------------------------------------------------------------ audio_too_long
def test_too_long_audio_is_refused_with_found_and_allowed(tmp_path):
    sf.write(tmp_path / "long.flac", make_tone(31.0), SAMPLE_RATE)
    message = fails_with(FailureCode.AUDIO_TOO_LONG, tmp_path / "long.flac", max_seconds=30.0)
    assert "31.00 s" in message and "at most 30 s" in message


def test_too_long_is_decided_from_the_header_before_decoding(tmp_path):
    """An MP3 announcing 60 s with only its first frames present: too long, never decoded as corrupt."""
    path = tmp_path / "long.mp3"
    sf.write(path, make_tone(60.0), SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    path.write_bytes(path.read_bytes()[:4000])
    assert "60.00 s" in fails_with(FailureCode.AUDIO_TOO_LONG, path, max_seconds=30.0)


# ------------------------------------------------------------------ streaming decode
def whole_file_reference(path) -> np.ndarray:
    """What decode_audio returned before it streamed: the whole file, channel mean, one soxr call."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    return mono if rate == SAMPLE_RATE else soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")


@pytest.mark.parametrize("rate,channels,seconds", [
    (48_000, 2, 7.3), (44_100, 2, 5.0), (22_050, 1, 13.0), (16_000, 1, 9.0), (8_000, 1, 20.1), (96_000, 6, 2.0),
])
def test_streamed_decode_equals_the_whole_file_path(tmp_path, rate, channels, seconds):
    """Longer than one block read in each case, so block edges fall inside the signal."""
    path = tmp_path / "a.wav"
    sf.write(path, make_tone(seconds, sr=rate, channels=channels), rate, subtype="FLOAT")
    reference = whole_file_reference(path)
    samples = decode_audio(path)
    assert samples.shape == reference.shape
    np.testing.assert_allclose(samples, reference, atol=1e-6)


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_files_written_to_a_pipe_decode_with_the_length_of_their_samples(tmp_path, fmt):
    """ffmpeg cannot seek back into a pipe to write the length: FLAC says 0 samples, WAV 0xFFFFFFFF."""
    source = tmp_path / "source.wav"
    sf.write(source, make_tone(95.5, sr=22_050), 22_050, subtype="PCM_16")
    piped = tmp_path / f"piped.{fmt}"
    subprocess.run(f"ffmpeg -loglevel error -i {source} -f {fmt} pipe:1 > {piped}", shell=True, check=True)
    samples = decode_audio(piped, max_seconds=4 * 3600)
    assert samples.size == round(95.5 * SAMPLE_RATE)
    np.testing.assert_allclose(samples, whole_file_reference(source), atol=1e-4)


@needs_ffmpeg
def test_a_header_without_a_length_is_limited_while_decoding(tmp_path):
    source = tmp_path / "source.wav"
    sf.write(source, make_tone(45.0), SAMPLE_RATE, subtype="PCM_16")
    subprocess.run(f"ffmpeg -loglevel error -i {source} -f flac pipe:1 > {tmp_path / 'p.flac'}", shell=True,
                   check=True)
    message = fails_with(FailureCode.AUDIO_TOO_LONG, tmp_path / "p.flac", max_seconds=30.0)
    assert "longer than 30 s" in message and "at most 30 s" in message




# ------------------------------------------------------------------ long inputs keep their failure codes
def test_a_long_recording_over_the_limit_is_refused_from_its_header(tmp_path):
    write_blockwise(tmp_path / "long.flac", 3 * 3600, lambda i, n: np.zeros((n, 1), np.int16), 8000,
                    subtype="PCM_16")
    message = fails_with(FailureCode.AUDIO_TOO_LONG, tmp_path / "long.flac", max_seconds=2 * 3600)
    assert "10800.00 s" in message and "at most 7200 s" in message


def test_a_truncated_long_wav_is_corrupt(tmp_path):
    path = tmp_path / "whole.wav"
    write_blockwise(path, 600, lambda i, n: make_tone(n / SAMPLE_RATE, seed=i), SAMPLE_RATE, subtype="PCM_16")
    (tmp_path / "cut.wav").write_bytes(path.read_bytes()[:44 + 2 * 400 * SAMPLE_RATE])
    assert "announces 600.00 s, it holds 400.00 s" in fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "cut.wav")


def test_nan_samples_deep_inside_a_long_file_are_found(tmp_path):
    def block(i, n):
        samples = make_tone(n / 48_000, sr=48_000, channels=2, seed=i)
        if i == 50:
            samples[1000:1005, 1] = np.nan
        return samples
    write_blockwise(tmp_path / "nan.wav", 60, block, 48_000, channels=2, subtype="FLOAT")
    assert "5 NaN or infinite samples" in fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "nan.wav")


# ------------------------------------------------------------------ damaged headers in plain words
LIBSNDFILE_WORDS = ("SF_INFO", "possibly a pipe", "unimplemented format", "Malformed", "Error", "psf_",
                    "larger than", "bytes expected")


def wav_header(rate: int, channels: int = 1, bits: int = 16, frames: int = 16_000) -> bytes:
    """A canonical PCM WAV whose fmt chunk says ``rate``, ``channels`` and ``bits``, whatever they are."""
    data = bytes(frames * channels * bits // 8)
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def assert_plain(message: str):
    assert not any(word in message for word in LIBSNDFILE_WORDS), message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("rate", [0, 4_000_000_000, 3_000_000_000])
def test_a_header_with_an_impossible_rate_is_one_plain_sentence(tmp_path, rate):
    (tmp_path / "a.wav").write_bytes(wav_header(rate))
    message = fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "a.wav")
    assert_plain(message)
    assert "impossible sample rate" in message and "WAV" in message and "re-export" in message


@pytest.mark.parametrize("rate", [1, 999, 2**31 - 1])
def test_a_sample_rate_no_recording_has_is_refused_before_decoding(tmp_path, rate):
    """A 1 Hz header would turn every byte into 16 000 output samples."""
    (tmp_path / "a.wav").write_bytes(wav_header(rate))
    message = fails_with(FailureCode.CORRUPT_AUDIO, tmp_path / "a.wav")
    assert_plain(message)
    assert f"{rate} Hz" in message


@pytest.mark.parametrize("prefix,kind", [
    (b"", None), (b"\xff\xfb\x90\x64", "MP3"), (b"ID3\x04", "MP3"), (b"RIFF\x00\x10\x00\x00WAVEfmt ", "WAV"),
    (b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"FORM\x00\x00\x10\x00AIFF", "AIFF"), (b"caff", "CAF"),
])
@pytest.mark.parametrize("name", ["upload.mp3", "upload.wav", "upload"])
def test_random_bytes_are_one_plain_sentence(tmp_path, prefix, kind, name):
    rng = np.random.default_rng(len(prefix))
    (tmp_path / name).write_bytes(prefix + rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioqError) as info:
        decode_audio(tmp_path / name)
    assert info.value.code in (FailureCode.UNSUPPORTED_FORMAT, FailureCode.CORRUPT_AUDIO)
    assert_plain(info.value.message)
    if info.value.code == FailureCode.CORRUPT_AUDIO:
        assert f"like {kind} audio" in info.value.message or "impossible" in info.value.message


def test_a_flac_header_claiming_weeks_is_too_long_or_truncated_and_never_reserved(tmp_path):
    """FLAC's STREAMINFO holds a 36-bit sample count: a 1 s file may claim 2^36 - 1 samples."""
    path = tmp_path / "a.flac"
    sf.write(path, make_tone(1.0), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    # STREAMINFO starts at byte 8; its last 36 bits before the MD5 (bytes 21-25) are the sample count.
    data[21] = (data[21] & 0xF0) | 0x0F
    data[22:26] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert "4294967.30 s" in fails_with(FailureCode.AUDIO_TOO_LONG, path, max_seconds=4 * 3600)
    # Without a limit the claim is not reserved (275 GB): the file decodes, and is called truncated.
    assert "announces 4294967.30 s, it holds 1.00 s" in fails_with(FailureCode.CORRUPT_AUDIO, path)
