"""The jobs one worker holds at once, all fed into one ``Engine.stream``.

A ``Batch`` starts with the job RQ's loop dequeued and then keeps taking jobs from the
queues itself, non-blocking, whenever the engine has room (``feed``), so a job that arrives
mid-batch, a high-priority one first, joins at the engine's next step. It holds:

- jobs being *prepared* (claim, request checks, fetch, decode: ``JobWork.prepare``) in
  ``prefetch_threads`` threads, up to ``prefetch_jobs`` beyond what the engine runs, so
  storage never idles the model (MLX work stays on this, the main, thread);
- jobs whose clips *run* in the engine, at most ``batch_max_jobs``, and clips whose KV rows
  (audio tokens + instruction + token budget) fit ``batch_token_budget`` together;
- jobs whose result is being *written* (``JobWork.result``, outputs to storage) in a thread.

Each job ends alone: a clip that fails fails its job only, and the job's other clips are
dropped at their next stage hook. The RQ side (claim, finish through RQ's own handlers,
release, resolve) is the worker's (``process.AudioWorker``); this module never touches
RQ's records itself, and the main thread does not wait for them: claims, outcomes, chunk
saves, progress and cancel checks of the jobs in the engine run in order on one records
thread (``records``), since a claim or a finish costs several round trips and much of RQ's
Python per job, which a drain of 512 jobs on the H200 paid on the loop's thread, 5.5 s of
20 (docs/design.md, "The records thread"). A batch ends once every outcome it handed over is on its record.

A job's deadline counts its own share of the batch's time (``share_time``), not the wall
time since its claim. The hard time limit (RQ's SIGALRM backstop) is armed whenever control
goes back to the engine with clips in it, for the job in it that has run longest on that
count; it raises ``HardTimeLimit`` out of the engine, and that job fails ``timeout`` while
the other jobs' clips run again.
Redis being away never fails a job here: the records thread and the other threads retry
their step (``outage.Backoff``) while the engine goes on with the clips it has.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from producer.failures import AudioqError, FailureCode
from worker import task
from worker.failures import HardTimeLimit
from worker.gemma4.engine import ClipOutput, ClipRequest
from worker.gemma4.features import audio_token_count
from worker.gemma4.scheduler import is_out_of_memory
from worker.lifecycle import at_once
from worker.outage import AWAY, Backoff

if TYPE_CHECKING:
    from rq.executions import Execution
    from rq.queue import Queue

    from worker.job import AudioJob
    from worker.process import AudioWorker

CLAIM_GROUP = 16  # jobs one task of the records thread claims, so that outcomes and cancel checks pass between
WAIT = 0.25  # seconds the main thread waits for a thread's step before it looks at the queues again
POLL = 0.2  # seconds between looks at queues found empty, so a busy engine's steps do not each cost round trips
FRONT_END_AHEAD = 4  # waiting clips per job whose log-mel frames are computed ahead of the engine
REPEAT_CHECK = 0.2  # seconds between checks of a repeated stage (every decode step's "generate") of one clip
SHARE_TICK = 0.05  # seconds between charges of the engine's time to the jobs in it, from the clips' hooks

log = logging.getLogger("audioq.worker")


class JobEnded(Exception):
    """Raised from a clip's stage hook once its job has ended: the engine drops the clip."""


def clip_cost(clip: ClipRequest) -> int:
    """KV rows the clip may hold, in tokens: an upper bound (an instruction has no more tokens than characters)."""
    audio = 0 if clip.samples is None else audio_token_count(clip.samples.size)
    return audio + len(clip.instruction) + clip.max_new_tokens


def charged(held: Held) -> float:
    """Seconds the job has run on its own account (``JobRun.elapsed``; since its claim before it has work)."""
    return held.work.run.elapsed() if held.work is not None else time.monotonic() - held.claimed_at


@dataclass(eq=False)
class Held:
    """One job of the batch, from claim to its outcome on the record."""

    job: AudioJob
    queue: Queue
    execution: Execution
    rank: tuple[int, int]  # (queue position, claim order): lower runs first
    prior_meta: dict  # the meta before the claim, put back if the job is released unrun
    claimed_at: float = field(default_factory=time.monotonic)
    work: task.JobWork | None = None  # None: refused before any work (not an audioq job)
    step: Future | None = None  # prepare or result, running in a thread
    queued_writes: Future | None = None  # its result step starts once the records thread has written these
    ready: bool = False  # prepared: its clips may go into the engine
    started: bool = False  # a clip of it has gone into the engine
    writing: bool = False  # its result step has been started
    waiting: list[ClipRequest] = field(default_factory=list)  # taken from the work, not yet in the engine
    in_engine: int = 0
    ended: bool = False  # its outcome is known; it is leaving the batch
    record_failure: BaseException | None = None  # a write of its record failed (a cancel among them): it ends so


class Batch:
    def __init__(self, worker: AudioWorker):
        self.worker = worker
        self.settings = worker.settings
        self.engine = worker.engine
        self.held: list[Held] = []
        self.claims = 0
        self.in_flight: dict[int, tuple[Held, ClipRequest, ClipRequest, int]] = {}  # id(clip) → ...
        self.tokens = 0  # clip_cost of the clips in the engine
        self.row_cap = math.inf  # lowered when the engine runs out of memory
        self.armed = False  # the hard time limit's timer is set
        self.backoff = Backoff(self.settings.redis_retry_max_wait)
        self.taking_again_at = 0.0
        self.shared_at = time.monotonic()  # when time was last charged to the held jobs (share_time)
        self.pool = ThreadPoolExecutor(max_workers=self.settings.prefetch_threads, thread_name_prefix="audioq-prefetch")
        self.records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audioq-records")
        self.records_backoff = Backoff(self.settings.redis_retry_max_wait)  # the records thread's own
        self.claiming: Future | None = None  # a group of claims running on the records thread
        self.claimed: deque[tuple] = deque()  # jobs it claimed, not yet held
        self.closing = False  # a cold shutdown: the records thread stops waiting for Redis

    # ------------------------------------------------------------------ the loop
    def run(self, job: AudioJob, queue: Queue, execution: Execution) -> None:
        """Run the first job and every job taken while it runs, until none is held and none is waiting."""
        started = time.perf_counter()
        totals: dict[str, float] = {}
        streamed = 0.0  # seconds inside the engine's streams
        try:
            self.hold(job, queue, execution)
            while self.held or self.claiming is not None:
                entered = time.perf_counter()
                try:
                    for key, value in self.engine.stream(self.feed, self.on_done).items():  # summed; peaks: the max
                        totals[key] = (max if key.startswith("peak") else sum)((totals.get(key, 0), value))
                except HardTimeLimit as exc:  # the alarm fired inside the engine's work
                    self.disarm()
                    self.hard_limit_reached(exc)
                finally:
                    streamed += time.perf_counter() - entered
        except BaseException:  # a cold shutdown (SystemExit, KeyboardInterrupt), or a fault of the worker's own
            self.disarm()
            self.abandon()
            raise
        finally:
            self.disarm()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.drain_records()
        wall = time.perf_counter() - started
        # the engine's idle time: outside its streams, and inside them its loop's time in feed and on_done
        # (``Engine.stream``'s "outside"; in an engine process that is the child's waits for clips, while
        # this thread's own work overlaps the child's)
        log.info("batch: %d jobs in %.3f s, %.3f s of it outside the engine (queues, storage, records); engine: %s",
                 self.claims, wall, wall - streamed + totals.get("outside", 0.0),
                 ", ".join(f"{k} {v:.3g}" for k, v in sorted(totals.items())))

    def drain_records(self) -> None:
        """Wait for the records thread (every outcome on its record before RQ's loop goes on); a signal
        meanwhile makes it stop waiting for Redis. Jobs it claimed that were never held go back."""
        try:
            self.records.shutdown(wait=True)
        except BaseException:
            self.closing = True
            raise
        finally:
            self.release_claimed()

    def feed(self, free: int) -> list[ClipRequest]:
        """The engine asks for up to ``free`` clips before every step (0 while it is full): collect what
        threads finished, take jobs (the prefetch goes on while the engine is full), hand out clips.

        Waits (for a thread's step) only while the engine runs nothing; returns none once
        nothing is held or being claimed, which ends the stream.
        """
        self.disarm()
        self.share_time()
        try:
            return self.next_clips(free)
        finally:
            self.arm()

    def next_clips(self, free: int) -> list[ClipRequest]:
        while True:
            self.advance()
            self.take(free)
            clips = self.hand_out(free)
            if clips:
                return clips
            if self.in_flight or not (self.held or self.claiming):
                return []
            steps = [h.step for h in self.held if h.step is not None] + [f for f in [self.claiming] if f]
            steps += [h.queued_writes for h in self.held if h.queued_writes is not None]
            if steps:
                wait(steps, timeout=WAIT, return_when=FIRST_COMPLETED)
            else:
                time.sleep(WAIT)

    def on_done(self, clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        self.disarm()
        self.share_time()
        try:
            self.take_back(clip, outcome)
        finally:
            self.arm()

    def take_back(self, clip: ClipRequest, outcome: ClipOutput | BaseException) -> None:
        held, original, _, cost = self.in_flight.pop(id(clip))
        held.in_engine -= 1
        self.tokens -= cost
        if held.ended:
            return
        if isinstance(outcome, BaseException):
            rows = self.rows_in_engine() + 1
            if is_out_of_memory(outcome) and rows > 1:  # alone, the clip is too big for this worker: it fails
                self.row_cap = max(1, rows // 2)
                log.warning("job %s: the engine ran out of memory with %d rows; its clip runs again with at most %d "
                            "rows at once", held.job.id, rows, self.row_cap)
                held.waiting.insert(0, original)
                return
            self.end(held, outcome)
            return
        try:
            held.work.clip_done(original, outcome)  # its chunk is saved on the records thread
        except Exception as exc:
            self.end(held, exc)
            return
        self.next_step(held)

    # ------------------------------------------------------------------ taking and preparing jobs
    def take(self, free: int) -> None:
        """Claim jobs from the queues (highest priority first), on the records thread, while the engine
        and the prefetch have room; they are held as ``advance`` collects them."""
        if self.worker.stopping:
            self.release_unstarted()
            return
        running = len({id(h) for h, *_ in self.in_flight.values()})
        wanted = min(self.settings.batch_max_jobs, running + free) + self.settings.prefetch_jobs - len(self.held)
        if (wanted > 0 and self.claiming is None and time.monotonic() >= self.taking_again_at
                and self.worker.may_take()):
            self.claiming = self.records.submit(self.claim_jobs, min(wanted, CLAIM_GROUP))

    def claim_jobs(self, count: int) -> tuple[BaseException | None, bool]:
        """On the records thread: up to ``count`` jobs claimed, each handed over at once (``claimed``);
        returns the error that stopped it and whether the queues ran dry."""
        for _ in range(count):
            if self.closing or not self.worker.may_take():
                break
            try:
                claimed = self.worker.take(give_up=self.closed)
            except Exception as exc:
                return exc, False
            if claimed is None:
                return None, True
            self.claimed.append(claimed)
        return None, False

    def collect_claims(self) -> None:
        """Hold the jobs the records thread claimed so far; once it is done, an error (Redis away, or
        refusing) delays the next claims."""
        while self.claimed:
            self.hold(*self.claimed.popleft())
        if self.claiming is None or not self.claiming.done():
            return
        error, dry = self.claiming.result()
        self.claiming = None
        while self.claimed:  # claimed after the first look
            self.hold(*self.claimed.popleft())
        if isinstance(error, AWAY):
            self.taking_again_at = time.monotonic() + self.backoff.failed(error, "taking jobs")
            return
        if error is not None:  # Redis refusing (read-only replica, out of memory...): the held jobs go on
            log.error("taking jobs failed (%s: %s); trying again in %g s", type(error).__name__, error,
                      self.settings.redis_retry_max_wait)
            self.taking_again_at = time.monotonic() + self.settings.redis_retry_max_wait
            return
        self.backoff.succeeded()
        if dry:
            self.taking_again_at = time.monotonic() + POLL

    def hold(self, job: AudioJob, queue: Queue, execution: Execution) -> None:
        self.claims += 1
        held = Held(job, queue, execution, (self.worker.queue_rank(queue), self.claims), prior_meta=dict(job.meta))
        self.held.append(held)
        try:
            job.func  # noqa: B018 - refuses what is not an audioq job (worker.job.AudioJob)
            request = job.args[0]
        except Exception as exc:
            self.end(held, exc)
            return
        held.work = task.JobWork(job, request, task.resident())
        self.worker.maintenance.count_time_by(job.id, held.work.run.elapsed)
        held.step = self.pool.submit(self.riding_out, held.work.prepare, f"preparing job {job.id}")

    def riding_out(self, step, doing: str) -> Any:
        """A thread's step, run again while Redis is away (it claims, records progress, writes the result),
        but not once the batch is closing."""
        return Backoff(self.settings.redis_retry_max_wait).retry(step, doing, give_up=self.closed)

    def advance(self) -> None:
        """Take in what the threads finished: claimed jobs are held, a prepared job gets its clips, a written
        result or a failed record write (a cancel) ends its job."""
        self.collect_claims()
        for held in list(self.held):
            if held.record_failure is not None and held.step is None:  # a result being written ends as written
                self.end(held, held.record_failure)
                continue
            if held.queued_writes is not None and held.queued_writes.done():
                held.queued_writes = None
                held.step = self.pool.submit(self.riding_out, self.result_step(held),
                                             f"writing the result of job {held.job.id}")
                continue
            if held.step is None or not held.step.done() or held.ended:
                continue
            step, held.step = held.step, None
            exc = step.exception()
            if exc is not None:
                self.end(held, exc)
            elif held.writing:
                self.end(held, step.result())
            else:
                held.ready = True
                held.work.run.write = self.writer(held)  # from now on its record is the records thread's
                if not self.worker.stopping:  # else it goes back unrun (release_unstarted)
                    self.next_step(held)

    def next_step(self, held: Held) -> None:
        """After a job was prepared or got an output back: write its result, or queue its next clips."""
        try:
            if held.work.complete:  # its result step starts once what was queued for its record is written
                held.writing = True
                held.queued_writes = self.records.submit(lambda: None)
                return
            held.waiting += held.work.clips()
            self.begin_front_ends(held)
        except Exception as exc:  # the job's own next step failed (its answer turn over budget, ...): it alone ends
            self.end(held, exc)
            return
        if not held.waiting and not held.in_engine:
            self.end(held, AudioqError(FailureCode.MODEL_ERROR, "the job has no clip left to run but no result"))

    def result_step(self, held: Held):
        """``JobWork.result`` in a thread, its record I/O back in that thread, so that a cancel stops the
        output write as it does outside a batch; none once the batch is closing (the reaper has the job)."""

        def write(action) -> None:
            if self.closing:
                raise JobEnded(f"job {held.job.id}: the worker is shutting down")
            at_once(action)

        def step() -> dict:
            held.work.run.write = write
            return held.work.result()

        return step

    def begin_front_ends(self, held: Held) -> None:
        """Start the front-end of the job's next few waiting clips (not all: a 4 h recording has 480)."""
        for clip in held.waiting[:FRONT_END_AHEAD]:
            self.engine.start_front_end(clip)

    # ------------------------------------------------------------------ the engine's side
    def rows_in_engine(self) -> int:
        return len(self.in_flight)

    def hand_out(self, free: int) -> list[ClipRequest]:
        """Clips for the engine, highest-priority job first, within the row, job and token budgets.

        Stops at the first clip that does not fit rather than letting a smaller, later one
        pass it, so a long clip is never starved; a clip over the whole budget runs alone.
        """
        rows = min(free, self.row_cap - self.rows_in_engine())
        if rows <= 0:
            return []
        running = {id(h) for h, *_ in self.in_flight.values()}
        handed: list[ClipRequest] = []
        for held in sorted((h for h in self.held if h.ready and h.waiting and not h.ended), key=lambda h: h.rank):
            if id(held) not in running and len(running) >= self.settings.batch_max_jobs:
                break
            while held.waiting and len(handed) < rows:
                cost = clip_cost(held.waiting[0])
                if self.tokens + cost > self.settings.batch_token_budget and (self.in_flight or handed):
                    return handed
                original = held.waiting.pop(0)
                self.begin_front_ends(held)
                clip = replace(original, on_stage=self.hook_for(held, original))
                self.in_flight[id(clip)] = (held, original, clip, cost)
                self.tokens += cost
                held.in_engine += 1
                held.started = True
                running.add(id(held))
                handed.append(clip)
            if len(handed) >= rows:
                break
        return handed

    def hook_for(self, held: Held, clip: ClipRequest):
        """The clip's own check point (its job's deadline; progress and cancel go to the records thread),
        plus the job's end."""
        own = clip.on_stage
        last = ["", -math.inf]  # the stage last passed on, and when

        def hook(stage: str) -> None:
            if held.ended:
                raise JobEnded(f"job {held.job.id} has ended")
            now = time.monotonic()
            if own is None or (stage == last[0] and now - last[1] < REPEAT_CHECK):
                return
            last[:] = stage, now
            if now - self.shared_at >= SHARE_TICK:
                self.share_time()
            own(stage)

        return hook

    # ------------------------------------------------------------------ the records thread
    def writer(self, held: Held):
        """``JobRun.write`` for a held job: its record reads and writes queue on the records thread."""

        def write(action) -> None:
            self.records.submit(self.recorded, held, action)

        return write

    def recorded(self, held: Held, action) -> None:
        """On the records thread: one read or write of the job's record, ridden out while Redis is away;
        its error (a cancel among them) is the job's outcome, which the loop records next."""
        try:
            self.records_backoff.retry(action, f"writing the record of job {held.job.id}", give_up=self.closed)
        except Exception as exc:
            if held.ended or self.closing:  # nobody will end the job with it: say so
                log.warning("job %s: a write of its record failed %s (%s: %s)", held.job.id,
                            "after its end" if held.ended else "while the worker shuts down", type(exc).__name__, exc)
            held.record_failure = held.record_failure or exc

    def closed(self) -> bool:
        return self.closing

    def share_time(self) -> None:
        """Charge each held job its share of the time since the last charge; the rest it waited for others.

        A job in the engine is charged the fraction of the engine's rows that are its own; a
        job prepared but waiting for room, or whose step waits for a free thread or for the
        records thread, nothing; a job whose own step (fetch and decode, writing its result)
        runs in a thread, all of it. So a job's deadline measures its own work, not the size
        of the batch it landed in (docs/design.md, "Several jobs at once").
        """
        now = time.monotonic()
        elapsed, self.shared_at = now - self.shared_at, now
        rows = Counter(id(held) for held, *_ in self.in_flight.values())
        for held in self.held:
            if held.work is None or held.ended or (held.step is not None and not self.queued(held.step)):
                continue
            share = rows[id(held)] / len(self.in_flight) if self.in_flight else 0.0
            held.work.run.waited += elapsed * (1.0 - share)

    @staticmethod
    def queued(step: Future) -> bool:
        """A thread's step that waits for a free thread: its job waits for the others meanwhile."""
        return not step.running() and not step.done()

    def arm(self) -> None:
        """RQ's hard time limit, for the job in the engine that has run longest on its own count (none: nothing runs).

        A timer to the fraction of a second, not RQ's whole-second ``alarm``: it is re-armed
        at every step, and rounding up each time would push it back for ever.
        """
        running = [h for h, *_ in self.in_flight.values() if not h.ended]
        if not running:
            return
        left = self.settings.hard_timeout - max(charged(h) for h in running)
        signal.signal(signal.SIGALRM, self.hard_limit)
        self.armed = True  # before the timer, which may fire at once
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))

    def disarm(self) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            self.armed = False

    def hard_limit(self, signum, frame) -> None:
        raise HardTimeLimit(f"Task exceeded maximum timeout value ({self.settings.hard_timeout} seconds)")

    def hard_limit_reached(self, exc: HardTimeLimit) -> None:
        """The alarm went off in the engine: the job that has run longest fails; the others' clips run again."""
        running = [h for h, *_ in self.in_flight.values() if not h.ended]
        for held in self.held:  # the alarm may have cut a stage hook between queueing a sync and handing it over
            if held.work is not None:
                held.work.run.sync_queued = False
        for held, original, _, cost in self.in_flight.values():
            held.in_engine -= 1
            held.waiting.insert(0, original)
        self.in_flight.clear()
        self.tokens = 0
        if running:
            self.end(max(running, key=charged), exc)

    # ------------------------------------------------------------------ ending jobs
    def end(self, held: Held, outcome: Any) -> None:
        """The job leaves the batch; its outcome (result dict, ``Retry`` or exception) goes on its record
        through RQ on the records thread, after every write of it queued before."""
        held.ended = True
        self.held.remove(held)
        self.records.submit(self.finish, held, outcome)

    def finish(self, held: Held, outcome: Any) -> None:
        try:
            self.records_backoff.retry(
                lambda: self.worker.finish(held.job, held.queue, held.execution, outcome, held.work),
                f"finishing job {held.job.id}", give_up=self.closed)
        except Exception:  # its beat stops, so the reaper resolves it; the batch goes on
            log.exception("job %s: its outcome could not be recorded; the reaper will resolve it", held.job.id)
            self.worker.stop_beating(held.job.id)

    def release_unstarted(self) -> None:
        """Warm shutdown: jobs claimed ahead but not started go back to the front of their queues, unrun.

        All at once, the last claimed first, once none is still being claimed or prepared (started
        jobs finish): released as each one's thread ended, they would go back out of order."""
        unstarted = [h for h in self.held if not (h.started or h.ended)]
        if self.claiming is not None or self.claimed or any(h.step is not None for h in unstarted):
            return
        for held in sorted(unstarted, key=lambda h: h.rank, reverse=True):
            held.ended = True
            self.backoff.retry(lambda: self.worker.release(held.job, held.queue, held.execution, held.prior_meta),
                               f"putting job {held.job.id} back")
            self.held.remove(held)

    def abandon(self) -> None:
        """Cold shutdown: unstarted jobs go back unrun; started ones are resolved as lost (requeued or worker_lost).

        The records thread first writes what it was handed (outcomes, chunks; not waiting for
        Redis), and the jobs it claimed but never handed over go back first."""
        self.closing = True
        self.records.shutdown(wait=True, cancel_futures=False)
        self.release_claimed()
        order = sorted((h for h in self.held if not h.ended), key=lambda h: h.rank, reverse=True)
        for held in (h for h in order if not h.started):
            self.resolving(held.job, lambda: self.worker.release(held.job, held.queue, held.execution,
                                                                 held.prior_meta))
        for held in (h for h in order if h.started):
            self.resolving(held.job, lambda: self.worker.abandon(held.job, held.execution))

    def release_claimed(self) -> None:
        """Jobs the records thread claimed that were never held go back first, the last claimed first (each
        goes to the front of its queue), so the queue keeps its order."""
        while self.claimed:
            job, queue, execution = self.claimed.pop()
            self.resolving(job, lambda: self.worker.release(job, queue, execution, dict(job.meta)))

    def resolving(self, job: AudioJob, action) -> None:
        try:
            action()
        except AWAY as exc:
            log.error("job %s: Redis is away during the cold shutdown (%s); the reaper resolves it once its "
                      "heartbeat expires", job.id, exc)

