"""Load with faults: many short jobs, worker processes SIGKILLed and Redis restarted on the way.

    python scripts/bench_load.py [--jobs 10000] [--workers 2] [--kills 4] [--model DIR]

Starts its own redis-server (AOF on, ``appendfsync always``) on a free port, enqueues
``--jobs`` jobs of one short ``file://`` clip (each its own job id) with ``enqueue_many``,
and runs ``--workers`` worker processes (``audioq worker --name load-N``), restarted under
the same name whenever one exits, as launchd's KeepAlive would. While they drain the
queue it SIGKILLs a worker ``--kills`` times (spread over the run) and restarts Redis once,
halfway (SIGTERM, then the same port and AOF file). At the end every job must be terminal
(finished, or failed with a code), none may be left queued or started, and none may have
two successful results (run to the end twice). Prints enqueue and drain rates, what the
faults cost, and a JSON summary. Without ``--model`` it uses the tiny random e2b checkpoint.
Liveness settings are scaled down (``--lost-after``), so lost jobs come back in seconds.
The run gives up when no job became terminal for ``--stall`` seconds (a stranded job).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from demo import AofRedis  # noqa: E402
from rq.registry import FailedJobRegistry, FinishedJobRegistry  # noqa: E402
from rq.results import Result  # noqa: E402

from producer import Client  # noqa: E402
from producer.settings import load_settings  # noqa: E402

POLL = 0.5  # seconds between progress checks
SUCCESSFUL = str(Result.Type.SUCCESSFUL.value).encode()  # a result stream entry's "type" field


class Workers:
    """``count`` worker processes, each restarted under its own name whenever it exits."""

    def __init__(self, count: int, url: str, model: str, env: dict[str, str], workdir: Path):
        self.names = [f"load-{i}" for i in range(count)]
        self.url, self.model, self.env, self.workdir = url, model, env, workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.exits: Counter = Counter()  # exit status -> how many times

    def start(self, name: str) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "producer", "--redis-url", self.url, "worker", "--model", self.model,
             "--name", name], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def keep_alive(self) -> None:
        for name in self.names:
            proc = self.procs.get(name)
            if proc is None:
                self.start(name)
            elif proc.poll() is not None:
                self.exits[proc.returncode] += 1
                self.start(name)

    def kill_one(self) -> str:
        """SIGKILL one worker and start it again at once (a crash and launchd's restart): its name must be free."""
        name = random.choice(self.names)
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()
        self.start(name)
        return name

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logged(self, text: str) -> int:
        """How often ``text`` occurs in the workers' logs."""
        return sum((self.workdir / f"{n}.log").read_text(errors="replace").count(text) for n in self.names)


def terminal_count(connection: redis.Redis, queue: str) -> int:
    return connection.zcard(FinishedJobRegistry(queue, connection=connection).key) + \
        connection.zcard(FailedJobRegistry(queue, connection=connection).key)


def successful_results(connection: redis.Redis, job_ids: list[str]) -> list[int]:
    """How many SUCCESSFUL results each job has in its RQ result stream."""
    counts = []
    for start in range(0, len(job_ids), 1000):
        with connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids[start:start + 1000]:
                pipe.xrange(f"rq:results:{job_id}")
            for entries in pipe.execute():
                counts.append(sum(1 for _, fields in entries if fields.get(b"type") == SUCCESSFUL))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--model")
    parser.add_argument("--clip-seconds", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--lost-after", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds of drain")
    parser.add_argument("--stall", type=float, default=120.0,
                        help="give up when no job became terminal for this many seconds")
    args = parser.parse_args()
    random.seed(0)

    workdir = Path(tempfile.mkdtemp(prefix="audioq-load-"))
    server = AofRedis(workdir)
    server.start()
    workers = None
    try:
        model = args.model
        if not model:
            from make_tiny_checkpoint import build_checkpoint

            model = str(build_checkpoint(workdir / "ckpt", "e2b"))
        clip = workdir / "clip.wav"
        rng = np.random.default_rng(0)
        sf.write(clip, (0.1 * rng.standard_normal(int(args.clip_seconds * 16000))).astype(np.float32), 16000)
        liveness = {"AUDIOQ_HEARTBEAT_INTERVAL": str(args.lost_after / 4), "AUDIOQ_LOST_AFTER": str(args.lost_after),
                    "AUDIOQ_LOST_JOB_RETRIES": "3", "AUDIOQ_STORAGE_RETRY_BACKOFF": "[1.0]"}
        settings = load_settings(environ=liveness, redis_url=server.url)
        client = Client(settings, connection=redis.Redis.from_url(server.url))
        queue = settings.default_queue

        requests = [{"audio_uri": clip.as_uri(), "max_new_tokens": args.max_new_tokens, "job_id": f"load-{i:06d}"}
                    for i in range(args.jobs)]
        started = time.perf_counter()
        created = sum(o.created for o in client.enqueue_many(requests))
        enqueue_s = time.perf_counter() - started
        print(f"enqueue_many: {created} jobs in {enqueue_s:.2f} s ({created / enqueue_s:,.0f}/s)")
        ids = [r["job_id"] for r in requests]

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   **liveness)
        env.pop("AUDIOQ_CONFIG", None)
        workers = Workers(args.workers, server.url, model, env, workdir)
        kill_at = [args.jobs * (k + 0.5) / args.kills for k in range(args.kills)]  # never at the restart
        restart_at, restarted, outage = args.jobs / 2, False, 0.0
        events = []
        started = progressed = time.perf_counter()
        done = 0
        while done < args.jobs and time.perf_counter() - started < args.timeout \
                and time.perf_counter() - progressed < args.stall:
            workers.keep_alive()
            time.sleep(POLL)
            try:
                now_done = terminal_count(client.connection, queue)
            except redis.ConnectionError:
                continue
            if now_done > done:
                done, progressed = now_done, time.perf_counter()
            if kill_at and done >= kill_at[0]:
                kill_at.pop(0)
                events.append(f"{time.perf_counter() - started:7.1f} s  {done:6d} done  SIGKILL {workers.kill_one()}")
            if not restarted and done >= restart_at:
                restarted = True
                down = time.perf_counter()
                server.stop()
                server.start()
                outage = time.perf_counter() - down
                events.append(f"{time.perf_counter() - started:7.1f} s  {done:6d} done  Redis restarted "
                              f"({outage:.2f} s down)")
        drain_s = time.perf_counter() - started
        workers.stop()

        statuses = client.status_many(ids)
        states = Counter(s.state for s in statuses)
        codes = Counter(s.failure.code.value for s in statuses if s.failure)
        requeued = sum(1 for s in statuses if s.attempt and s.attempt > 1)
        doubled = sum(1 for n in successful_results(client.connection, ids) if n > 1)
        lost = args.jobs - states["finished"] - states["failed"]
        for line in events:
            print(line)
        print(f"drain: {args.jobs} jobs by {args.workers} workers in {drain_s:.1f} s "
              f"({args.jobs / drain_s:.1f} jobs/s, {args.jobs / drain_s * 60:,.0f} jobs/min)")
        print(f"states: {dict(states)}; failure codes: {dict(codes)}; run more than once: {requeued}; "
              f"not terminal: {lost}; doubled: {doubled}")
        recovered = {"lost jobs requeued": workers.logged(" requeued: worker "),
                     "orphans put back": workers.logged("put back at the front"),
                     "names taken back": workers.logged("taken back from a gone worker")}
        print(f"worker exits (besides the kills): {dict(+workers.exits)}; tracebacks in worker logs: "
              f"{workers.logged('Traceback')}; {recovered}")
        print(json.dumps({"jobs": args.jobs, "workers": args.workers, "kills": args.kills,
                          "enqueue_per_s": round(created / enqueue_s), "drain_s": round(drain_s, 1),
                          "drain_per_s": round(args.jobs / drain_s, 2), "redis_outage_s": round(outage, 2),
                          "states": dict(states), "failure_codes": dict(codes), "run_more_than_once": requeued,
                          "not_terminal": lost, "doubled": doubled, "worker_exits": dict(+workers.exits), **recovered}))
        return 0 if lost == 0 and doubled == 0 else 1
    finally:
        if workers is not None:
            workers.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
