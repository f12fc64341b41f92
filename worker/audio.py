"""Audio file → mono float32 samples at 16 kHz, or an ``AudioqError`` saying why not.

Pure functions, no queue concerns: the worker and the local ``audioq transcribe`` both
call ``decode_audio``. soundfile (libsndfile) decodes WAV, FLAC, Ogg Vorbis/Opus, MP3,
AIFF and CAF; the common containers it cannot read are recognised by their first bytes,
so the error names the container instead of libsndfile's "Format not recognised".

libsndfile decodes damaged files without complaint: for chunked formats (WAV, AIFF, CAF)
it trims the frame count to the bytes present and only notes the header's claim in its
parse log (``data : 253134 (should be 250602)``); for MP3 it keeps the header's count
and returns fewer frames. ``missing_frames`` reads both signs, so a truncated upload
fails as ``corrupt_audio`` instead of yielding a silently shorter transcript.
"""

from __future__ import annotations

import os
import re

import numpy as np
import soundfile as sf
import soxr

from producer.failures import AudioqError, FailureCode
from worker.gemma4.features import SAMPLE_RATE
# The shortest clip that yields one audio token: Gemma 4's front-end needs 161 samples
# (one 20 ms window with its 10 ms hop and semicausal padding) for a single valid frame.
MIN_SAMPLES = 161
SUPPORTED = "wav, flac, ogg (vorbis, opus), mp3, aiff, caf"

# A healthy MP3 without a Xing/Info header decodes up to ~0.035 s short of libsndfile's
# size-based estimate (measured on sox and ffmpeg CBR files), so a file is truncated only
# when more than this much of the announced audio is missing.
TRUNCATION_TOLERANCE_SECONDS = 0.1
TRUNCATION_TOLERANCE_FRACTION = 0.01
# Streaming writers leave the size fields as placeholders (ffmpeg writes 0xFFFFFFFF to a
# pipe, sox and ffmpeg's AIFF write 0); a real claim this large is beyond any size limit.
STREAMING_PLACEHOLDER = 2**31 - 1
_CHUNK_CLAIM = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_CUT = "Junk after the last page"


def sniff_container(head: bytes) -> str | None:
    """The name of an unsupported container recognised by its first bytes, else None."""
    if head[4:8] == b"ftyp":
        return "MP4/M4A (AAC or ALAC)"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)"  # MP3 frames share the 0xFFF sync but have non-zero layer bits
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/Matroska"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "ASF (WMA)"
    if head.startswith(b"#!AMR"):
        return "AMR"
    return None


def looks_like_audio(head: bytes) -> bool:
    """Whether the first bytes start a container libsndfile reads (WAV/RF64, FLAC, Ogg, MP3, AIFF, CAF).

    libsndfile picks its MP3 decoder by file extension, so a text file named ``.mp3``
    fails with a misleading I/O message; this tells "not audio" from "damaged audio".
    """
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b"caff") or head[:3] == b"ID3":
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0  # MPEG audio frame sync


def missing_frames(info, decoded: int) -> int:
    """Frames that ``info`` (``sf.info``) announces but the decoder did not deliver (≤ 0: none)."""
    missing = info.frames - decoded
    for claimed, present in ((int(a), int(b)) for a, b in _CHUNK_CLAIM.findall(info.extra_info)):
        if 0 < present < claimed < STREAMING_PLACEHOLDER and info.frames:
            missing = max(missing, round((claimed - present) * info.frames / present))
    return missing


def decode_audio(path: str | os.PathLike, *, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at 16 kHz, shape ``[n]``.

    ``max_seconds`` is checked against the header before the file is decoded, and again
    against the decoded length (MP3 headers can be estimates).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise AudioqError(FailureCode.EMPTY_AUDIO, "the file is empty (0 bytes)")
    container = sniff_container(head)
    if container:
        raise AudioqError(FailureCode.UNSUPPORTED_FORMAT,
                          f"{container} audio is not supported; convert it to one of: {SUPPORTED}")
    try:
        info = sf.info(path)
    except sf.LibsndfileError as exc:
        if "Format not recognised" in exc.error_string or not looks_like_audio(head):
            raise AudioqError(FailureCode.UNSUPPORTED_FORMAT,
                              f"not a recognised audio file; supported: {SUPPORTED}") from None
        raise AudioqError(FailureCode.CORRUPT_AUDIO, f"cannot read the audio header: {exc.error_string}") from None
    if max_seconds is not None and info.duration > max_seconds:
        raise AudioqError(FailureCode.AUDIO_TOO_LONG,
                          f"the audio is {info.duration:.2f} s long; at most {max_seconds:g} s is allowed")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioqError(FailureCode.CORRUPT_AUDIO, f"cannot decode the audio: {exc.error_string}") from None
    if data.shape[0] == 0:
        raise AudioqError(FailureCode.EMPTY_AUDIO, f"the {info.format} file holds no audio samples")
    announced = data.shape[0] + missing_frames(info, data.shape[0])
    if announced - data.shape[0] > rate * TRUNCATION_TOLERANCE_SECONDS + announced * TRUNCATION_TOLERANCE_FRACTION:
        raise AudioqError(FailureCode.CORRUPT_AUDIO,
                          f"the file is truncated: its header announces {announced / rate:.2f} s, "
                          f"it holds {data.shape[0] / rate:.2f} s")
    if _OGG_CUT in info.extra_info:
        raise AudioqError(FailureCode.CORRUPT_AUDIO,
                          "the Ogg stream ends inside a page: the file is truncated or has trailing junk")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise AudioqError(FailureCode.CORRUPT_AUDIO, f"the audio has {bad} NaN or infinite samples")
    samples = to_mono_16k(data, rate)
    if samples.size < MIN_SAMPLES:
        raise AudioqError(FailureCode.EMPTY_AUDIO,
                          f"the audio is {samples.size} samples ({samples.size / SAMPLE_RATE * 1000:.1f} ms) at "
                          f"16 kHz; at least {MIN_SAMPLES} samples are needed for one audio token")
    if max_seconds is not None and samples.size > max_seconds * SAMPLE_RATE:
        raise AudioqError(FailureCode.AUDIO_TOO_LONG,
                          f"the audio is {samples.size / SAMPLE_RATE:.2f} s long; at most {max_seconds:g} s is allowed")
    return samples


def to_mono_16k(data: np.ndarray, rate: int) -> np.ndarray:
    """[frames, channels] at ``rate`` → [n] float32 at 16 kHz (channel mean, soxr HQ)."""
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
