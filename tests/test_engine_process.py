"""The engine in a process of its own (``worker.engine_process``): the worker's seam and the child's life.

Through ``EngineProcess`` — the calls the worker makes on an ``Engine`` — clips give the
outcomes they give in-process, token for token; a stage hook that raises in the worker ends
its clip alone; a stream cut by an exception leaves nothing behind for the next one; a child
that dies is reported, never waited for. With real worker processes: a worker whose engine
process dies resolves its job at once and exits 4 (its supervisor starts it again), and a
worker killed with SIGKILL leaves no engine process behind.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tone
from worker_fixtures import (enqueue, fetch, long_tone, procs, start_worker, wait_for,  # noqa: F401
                             worker_settings)

from producer import record
from producer.failures import AudioqError, FailureCode
from worker.engine_process import EngineLost, EngineProcess
from worker.failures import HardTimeLimit
from worker.gemma4.engine import ClipOutput, ClipRequest, Engine
from worker.gemma4.features import clip_features

MAX_ROWS = 3  # fewer rows than clips: clips wait for room and join mid-flight


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("e2b"))


@pytest.fixture(scope="module")
def local(checkpoint):
    return Engine.load(checkpoint, max_rows=MAX_ROWS)


@pytest.fixture(scope="module")
def remote(checkpoint):
    engine = EngineProcess(checkpoint, dict(max_rows=MAX_ROWS))
    yield engine
    engine.close()


def clips() -> list[ClipRequest]:
    """Audio of several lengths, a text-only turn, and two clips the engine refuses."""
    audio = [ClipRequest(make_tone(s, freq=200 + 70 * i, seed=i)[:, 0], "Transcribe this audio.", 6 + 3 * i)
             for i, s in enumerate([0.4, 2.0, 5.0, 11.0])]
    broken = make_tone(1.0, seed=9)[:, 0].copy()
    broken[100] = np.nan
    return audio + [ClipRequest(None, "Say hello.", 5), ClipRequest(broken, "Transcribe this audio.", 5),
                    ClipRequest(np.zeros(0, np.float32), "Transcribe this audio.", 5)]


def run(engine, requests: list[ClipRequest], feed_error: BaseException | None = None) -> list:
    """Every clip's outcome, in the given order, through ``engine.stream`` (clips fed two at a time)."""
    pending = list(requests)
    outcomes = {}

    def feed(free: int) -> list[ClipRequest]:
        if feed_error is not None and len(pending) < len(requests):
            raise feed_error
        taken = pending[:min(free, 2)]
        del pending[:len(taken)]
        return taken

    engine.stream(feed, lambda clip, outcome: outcomes.__setitem__(id(clip), outcome))
    return [outcomes.get(id(c)) for c in requests]


def summary(outcome) -> tuple:
    if isinstance(outcome, ClipOutput):
        return outcome.text, outcome.tokens, outcome.audio_tokens
    return type(outcome).__name__, outcome.code if isinstance(outcome, AudioqError) else None


def test_clips_through_the_engine_process_have_the_outcomes_they_have_in_process(remote, local):
    requests = clips()
    for clip in requests[::2]:  # some with their log-mel frames begun in the worker, some computed there
        remote.start_front_end(clip)
    outcomes = run(remote, requests)
    assert [summary(o) for o in outcomes] == [summary(o) for o in run(local, clips())]
    assert [summary(o)[1] for o in outcomes[-2:]] == [FailureCode.CORRUPT_AUDIO, FailureCode.EMPTY_AUDIO]
    assert all(o.timings["generate"] > 0 for o in outcomes[:5])


def test_frames_still_being_computed_in_the_worker_are_waited_for_not_computed_again(remote, local):
    """A clip is fed as soon as its job is ready, often before its log-mel frames are: it waits in
    the worker for them (the child computing frames itself would stall its decode loop). The
    frames given here are a louder clip's, so the outcome shows whose frames the engine used."""
    quiet, loud = (make_tone(5.0, freq=300, seed=3)[:, 0] * gain for gain in (0.05, 1.0))
    late = Future()
    clip = ClipRequest(quiet, "Transcribe this audio.", 12, frames=late)
    threading.Timer(0.3, lambda: late.set_result(clip_features(loud))).start()
    (outcome,) = run(remote, [clip])
    (with_loud,) = run(local, [ClipRequest(quiet, "Transcribe this audio.", 12, frames=done(clip_features(loud)))])
    (with_quiet,) = run(local, [ClipRequest(quiet, "Transcribe this audio.", 12)])
    assert summary(outcome) == summary(with_loud) != summary(with_quiet)


def test_a_clip_waiting_for_its_frames_still_passes_its_check_point(remote):
    """A job canceled (or out of time) while its clip waits in the worker for log-mel frames ends then,
    not once the frames are done; its room is the next clip's."""
    canceled = AudioqError(FailureCode.CANCELED, "canceled by the producer")

    def cancel_at_front_end(stage: str) -> None:
        if stage == "front_end":
            raise canceled

    late = Future()
    timer = threading.Timer(5.0, lambda: late.set_result(clip_features(make_tone(5.0, seed=4)[:, 0])))
    timer.start()
    try:
        started = time.monotonic()
        waiting = ClipRequest(make_tone(5.0, seed=4)[:, 0], "Transcribe this audio.", 4, frames=late,
                              on_stage=cancel_at_front_end)
        outcome, after = run(remote, [waiting, clips()[1]])
        assert outcome is canceled and isinstance(after, ClipOutput)
        assert time.monotonic() - started < 4.0, "the canceled clip waited for its frames"
    finally:
        timer.cancel()


def done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def test_a_stage_hook_that_raises_in_the_worker_ends_its_clip_alone(remote, local):
    requests = clips()[:5]
    seen = []
    canceled = AudioqError(FailureCode.CANCELED, "canceled by the producer")

    def hook(stage: str) -> None:
        seen.append(stage)
        if stage == "generate":
            raise canceled

    requests[3].on_stage = hook
    outcomes = run(remote, requests)
    assert outcomes[3] is canceled and seen[-1] == "generate"
    expected = run(local, clips()[:5])
    assert [summary(o) for i, o in enumerate(outcomes) if i != 3] == [summary(o) for i, o in enumerate(expected)
                                                                        if i != 3]


def test_clips_ended_in_the_worker_give_their_room_back_at_once(remote, local):
    """In-process, a row whose hook raises frees its room at once. A worker whose engine is full
    and whose clips all ended on its side must be offered room for its next clip: with none, its
    feed would wait for ever for a job that cannot fit (the batch's feed blocks while nothing runs)."""
    def ended(stage: str) -> None:
        if stage == "generate":
            raise AudioqError(FailureCode.CANCELED, "canceled by the producer")

    doomed = [ClipRequest(make_tone(2.0, seed=10)[:, 0], "Transcribe this audio.", 2000, on_stage=ended)
              for _ in range(MAX_ROWS)]
    last = clips()[1]
    pending, outstanding, outcomes = doomed + [last], set(), {}

    def feed(free: int) -> list[ClipRequest]:
        assert free > 0 or outstanding or not pending, "no room offered while none of the worker's clips runs"
        taken = pending[:free]
        del pending[:len(taken)]
        outstanding.update(id(c) for c in taken)
        return taken

    def on_done(clip: ClipRequest, outcome) -> None:
        outstanding.discard(id(clip))
        outcomes[id(clip)] = outcome

    remote.stream(feed, on_done)
    assert all(outcomes[id(c)].code == FailureCode.CANCELED for c in doomed)
    assert summary(outcomes[id(last)]) == summary(run(local, [clips()[1]])[0])


def test_a_stream_cut_by_an_exception_leaves_nothing_behind_for_the_next(remote, local):
    with pytest.raises(KeyboardInterrupt):
        run(remote, clips()[:4], feed_error=KeyboardInterrupt())
    assert [summary(o) for o in run(remote, clips())] == [summary(o) for o in run(local, clips())]


@pytest.mark.parametrize("first, late", [(SystemExit, HardTimeLimit), (HardTimeLimit, SystemExit)])
def test_a_signal_while_a_cut_stream_winds_down_never_hides_a_shutdown(checkpoint, local, first, late):
    """A cut stream waits for the child to drop its rows. The batch's time-limit alarm firing during
    a shutdown's wait must not turn the shutdown into one failed job and a worker that carries on;
    a shutdown arriving during a time limit's wait wins. The child is stopped, so the wait is long,
    and it resumes only once the next stream has begun: it ends the cut stream then, and the next
    one runs as if nothing had happened."""
    engine = EngineProcess(checkpoint, dict(max_rows=MAX_ROWS))

    def alarm(signum, frame):
        raise late()

    def cut_at_generate(stage: str) -> None:
        if stage == "generate":
            os.kill(engine.process.pid, signal.SIGSTOP)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            raise first()

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        with pytest.raises(SystemExit):
            run(engine, [ClipRequest(make_tone(2.0, seed=10)[:, 0], "Transcribe this audio.", 4000,
                                     on_stage=cut_at_generate)])
        threading.Timer(0.5, os.kill, (engine.process.pid, signal.SIGCONT)).start()
        following = {}
        thread = threading.Thread(target=lambda: following.update(outcomes=run(engine, clips())), daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the next stream never began: the child took its start for the cut one's"
        assert [summary(o) for o in following["outcomes"]] == [summary(o) for o in run(local, clips())]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.kill(engine.process.pid, signal.SIGCONT)
        engine.close()


def test_an_engine_process_that_dies_is_reported_not_waited_for(checkpoint, tmp_path):
    engine = EngineProcess(checkpoint, dict(max_rows=MAX_ROWS))
    samples = make_tone(2.0, seed=10)[:, 0]

    def kill_at_generate(stage: str) -> None:
        if stage == "generate" and engine.process.poll() is None:
            engine.process.kill()

    try:
        with pytest.raises(EngineLost, match="exited with status -9"):
            run(engine, [ClipRequest(samples, "Transcribe this audio.", 4000, on_stage=kill_at_generate)])
        assert isinstance(engine.lost, EngineLost)
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------- real workers
def engine_pid(log: Path) -> int:
    found = wait_for(lambda: re.search(r"\(process (\d+)\)", log.read_text()), timeout=60,
                     what="the worker to start its engine process")
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


def test_a_worker_whose_engine_process_dies_resolves_its_job_at_once_and_exits_4(redis_url, redis_conn,
                                                                                tiny_checkpoint, tmp_path, procs):
    settings = worker_settings(redis_url, model=str(tiny_checkpoint()), lost_job_retries=1, lost_after=30.0)
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    procs.append(worker)
    pid = engine_pid(log)
    job = enqueue(redis_conn, {"audio_uri": long_tone(tmp_path / "long.wav").as_uri(), "max_new_tokens": 2048})
    wait_for(lambda: (job.get_meta(refresh=True).get(record.META_PROGRESS) or {}).get("stage") == "generate",
             timeout=60, what="the job to be generating")
    os.kill(pid, signal.SIGKILL)
    assert worker.wait(timeout=30) == 4, log.read_text()
    job = fetch(redis_conn, job.id)
    # resolved by the worker itself, long before its beat (lost_after 30 s) would have expired
    assert job.get_status() == "queued" and job.meta.get(record.META_LOST), log.read_text()
    assert "engine process exited with status -9" in log.read_text()


def test_a_sigkilled_worker_leaves_no_engine_process_behind(redis_url, tiny_checkpoint, tmp_path, procs):
    log = tmp_path / "worker.log"
    worker = start_worker(worker_settings(redis_url, model=str(tiny_checkpoint())), log)
    procs.append(worker)
    pid = engine_pid(log)
    assert alive(pid)
    worker.kill()
    worker.wait()
    wait_for(lambda: not alive(pid), timeout=10, what="the engine process to exit with its worker")
