"""Long audio: decode time, chunk-plan time, wall time and the audio path's peak memory.

    python scripts/bench_long.py [--workdir DIR] [--compare] [FILE ...]

Without FILEs it measures two recordings it makes under ``--workdir`` (kept, and reused
when present): a 1-hour 16 kHz mono FLAC and a 4-hour 48 kHz stereo FLAC, both espeak-ng
speech with pauses over room tone (``scripts/recordings.py``). Each file is decoded and
planned in a child process of its own, so its peak RSS is the audio path's and nothing
else's; the child also reports its RSS before decoding (interpreter and imports), and the
16 kHz mono float32 signal's size, which the audio path's growth is compared with.

``--compare`` also runs the whole-file path decode_audio had before it streamed
(``sf.read`` of every frame and channel as float32, channel mean, one soxr call) on the
files where that costs under 4 GB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RSS_UNITS_PER_MB = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
PAUSES = (0.7, 1.3, 0.9, 2.2, 0.6, 1.6, 8.0)  # after each sentence, cycled: one 8 s silence in seven
WHOLE_FILE_LIMIT = 4 * 2**30


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RSS_UNITS_PER_MB


def measure(path: str, whole_file: bool) -> dict:
    """In the child: decode (streamed, or the old whole-file way) and plan one file."""
    started = time.perf_counter()
    import numpy as np
    import soundfile as sf
    import soxr

    from worker.audio import SAMPLE_RATE, decode_audio
    from worker.chunk_plan import plan_chunks

    baseline = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if whole_file:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32)
        del data
        samples = mono if rate == SAMPLE_RATE else soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
        del mono
    else:
        samples = decode_audio(path)
    decoded = peak_rss_mb()
    t1, c1 = time.perf_counter(), time.process_time()
    plan = plan_chunks(samples)
    t2, c2 = time.perf_counter(), time.process_time()
    sizes = [chunk.size / SAMPLE_RATE for chunk in plan.chunks]
    return {
        "file": Path(path).name, "path": "whole file" if whole_file else "streamed",
        "audio_s": samples.size / SAMPLE_RATE, "decode_s": t1 - t0, "plan_s": t2 - t1, "wall_s": t2 - started,
        "decode_cpu_s": c1 - c0, "plan_cpu_s": c2 - c1,
        "baseline_rss_mb": baseline, "peak_rss_after_decode_mb": decoded, "peak_rss_mb": peak_rss_mb(),
        "signal_mb": samples.nbytes / 2**20, "chunks": len(plan.chunks), "speech_s": plan.speech_seconds,
        "chunk_s_min_median_max": [min(sizes), sorted(sizes)[len(sizes) // 2], max(sizes)] if sizes else [],
    }


def make_recordings(workdir: Path) -> list[Path]:
    """The 1-hour mono and 4-hour 48 kHz stereo FLACs (made once; ~1 GB for the second)."""
    import numpy as np
    import soxr
    from recordings import speech_with_pauses, write_blockwise

    mono, stereo = workdir / "speech-1h-16k-mono.flac", workdir / "speech-4h-48k-stereo.flac"
    if mono.exists() and stereo.exists():
        return [mono, stereo]
    workdir.mkdir(parents=True, exist_ok=True)
    meeting = speech_with_pauses(list(itertools.islice(itertools.cycle(PAUSES), 27))).samples
    print(f"recording: {meeting.size / 16000:.1f} s of speech and pauses, repeated", file=sys.stderr)

    def tiled(source, rate, i, n):
        return source[np.arange(i * rate, i * rate + n) % source.size]

    write_blockwise(mono, 3600, lambda i, n: tiled(meeting, 16_000, i, n)[:, None], 16_000, format="FLAC",
                    subtype="PCM_16")
    high = soxr.resample(meeting, 16_000, 48_000, quality="HQ")
    write_blockwise(stereo, 4 * 3600, lambda i, n: np.stack([tiled(high, 48_000, i, n),
                                                             0.8 * tiled(high, 48_000, i, n)], axis=1),
                    48_000, channels=2, format="FLAC", subtype="PCM_16")
    return [mono, stereo]


def whole_file_cost(path: Path) -> int:
    """Bytes the whole-file path holds at once: every frame and channel as float32, plus the mono mix."""
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames * (info.channels + 1) * 4


def run_child(path: Path, whole_file: bool) -> dict:
    args = [sys.executable, __file__, "--measure", str(path)] + (["--whole-file"] if whole_file else [])
    started = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {**json.loads(out), "child_wall_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/audioq-bench-long"))
    parser.add_argument("--compare", action="store_true", help="also run the old whole-file decode")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--whole-file", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.whole_file)))
        return 0

    files = args.files or make_recordings(args.workdir)
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the start")
    results = []
    for path in files:
        results.append(run_child(path, whole_file=False))
        if args.compare and whole_file_cost(path) < WHOLE_FILE_LIMIT:
            results.append(run_child(path, whole_file=True))
    print(f"{'file':>28} {'path':>10} {'audio s':>8} {'decode s':>8} {'(cpu)':>6} {'plan s':>7} {'(cpu)':>6} "
          f"{'wall s':>7} "
          f"{'signal MB':>9} {'base MB':>8} {'peak MB':>8} {'growth/signal':>13} {'chunks':>6} {'speech s':>8}")
    for r in results:
        growth = (r["peak_rss_mb"] - r["baseline_rss_mb"]) / r["signal_mb"]
        print(f"{r['file']:>28} {r['path']:>10} {r['audio_s']:8.0f} {r['decode_s']:8.2f} {r['decode_cpu_s']:6.2f} "
              f"{r['plan_s']:7.2f} {r['plan_cpu_s']:6.2f} "
              f"{r['child_wall_s']:7.2f} {r['signal_mb']:9.0f} {r['baseline_rss_mb']:8.0f} {r['peak_rss_mb']:8.0f} "
              f"{growth:13.2f} {r['chunks']:6d} {r['speech_s']:8.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
