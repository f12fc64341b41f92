"""Anatomy of one batched decode step: where its milliseconds go, part by part.

    python scripts/bench_decode_step.py [--preset e2b-size] [--rows 64 256] [--width 850]

Builds the decoder of a ``make_tiny_checkpoint.py`` preset with random weights straight in
MLX (no checkpoint on disk; ~10 GB for ``e2b-size``), prefills ``rows`` random prompts and
times, for each batch:

- one decode step, synchronously and pipelined as ``Scheduler`` runs it (the next step
  built and queued while the current one computes; ``--depth``: that many), with padded
  prompts (lengths spread over a third to all of ``width``: array masks) and equal ones
  (no mask); for one row, also mlx-lm's own single-stream model call and caches;
- the Python part alone (building the step's graph), and the pipelined step again while
  ``--busy`` threads run pure Python beside it, as a worker's records and prefetch threads do,
  at each ``--switch-interval`` (how long a thread may keep the interpreter lock when another
  wants it);
- a row leaving (``KVBatch.keep``) and 16 rows joining (``KVBatch.extend``), and 16 rows written
  into the rows of finished ones instead (``KVBatch.place``);
- the attention call of one layer at the step's shapes, as mlx-lm makes it (grouped query
  heads) and with the query heads laid out as positions of the one KV head;
- the pipelined step again with mlx-lm's own attention entry point instead of
  ``attention.decode_attention`` (sliding layers still read only their window).

Timing only; the results are read in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import gemma4_text
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine  # noqa: E402
from make_tiny_checkpoint import PRESETS  # noqa: E402
from worker.gemma4 import attention  # noqa: E402
from worker.gemma4.config import TokenIds  # noqa: E402
from worker.gemma4.decoder import Decoder  # noqa: E402

TOKENS = TokenIds(pad=0, bos=2, audio=-1, boa=-2, eoa=-3, stop=(1,), multimodal=())


def build_decoder(preset: str, dtype: mx.Dtype) -> Decoder:
    spec = dict(PRESETS[preset]["text"], model_type="gemma4_text")
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(spec))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return Decoder(model, TOKENS)


def prefill(decoder: Decoder, rows: int, width: int, padded: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 3, width + 1, rows) if padded else [width] * rows
    lengths[0] = width
    vocab = decoder.lm.args.vocab_size
    prompts = [[TOKENS.bos] + rng.integers(10, vocab, n - 1).tolist() for n in lengths]
    logits, batch = decoder.prefill(prompts, [None] * rows)
    token = mx.argmax(logits, axis=-1)
    mx.eval(token, [c.state[:2] for c in batch.caches])
    return token, batch


def ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def synchronous(decoder: Decoder, token, batch, steps: int) -> tuple[float, float]:
    """Median ms of the Python part and of the whole step, one step at a time."""
    build, total = [], []
    for _ in range(steps):
        started = time.perf_counter()
        following = mx.argmax(decoder.step(token, batch), axis=-1)
        built = time.perf_counter()
        mx.eval(following)
        build.append(built - started)
        total.append(time.perf_counter() - started)
        token = following
    return ms(build), ms(total)


def pipelined(decoder: Decoder, token, batch, steps: int, depth: int = 1) -> float:
    """Mean ms a step when ``depth`` steps are queued before the oldest is read (``Scheduler._step``
    queues one: deeper bought nothing, docs/benchmarks.md)."""
    return queued(lambda t: mx.argmax(decoder.step(t, batch), axis=-1), token, steps, depth)


def plain_stream(decoder: Decoder, width: int, steps: int) -> float:
    """Mean ms a step of one row through mlx-lm's own model call and caches (its ``generate_step`` loop)."""
    cache = make_prompt_cache(decoder.lm)
    vocab = decoder.lm.args.vocab_size
    prompt = mx.array([[TOKENS.bos] + [10 + i % (vocab - 10) for i in range(width - 1)]])
    token = mx.argmax(decoder.lm(prompt, cache=cache)[:, -1], axis=-1)

    def step(t):
        return mx.argmax(decoder.lm(t[:, None], cache=cache)[:, -1], axis=-1)

    queued(step, token, 3)  # first use of these shapes
    return queued(step, token, steps)


def queued(step, token, steps: int, depth: int = 1) -> float:
    """Mean ms of ``steps`` calls of ``step`` (token → next token), ``depth`` of them queued before the
    oldest one's tokens are read."""
    started = time.perf_counter()
    unread = deque([token])
    for _ in range(steps):
        following = step(unread[-1])
        mx.async_eval(following)
        unread.append(following)
        while len(unread) > depth:
            unread.popleft().tolist()
    while unread:
        unread.popleft().tolist()
    return 1e3 * (time.perf_counter() - started) / steps


@contextmanager
def busy(threads: int):
    """Threads running pure Python (holding the interpreter lock) while the body runs."""
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            sum(range(2_000))

    workers = [threading.Thread(target=spin, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        done.set()
        for w in workers:
            w.join()


def leave_and_join(decoder: Decoder, batch, width: int) -> tuple[float, float]:
    """ms of one row leaving the batch and of 16 new rows joining it, each evaluated."""
    started = time.perf_counter()
    batch.keep(list(range(1, batch.rows)))
    mx.eval([c.state[:2] for c in batch.caches])
    keep = time.perf_counter() - started
    _, joining = prefill(decoder, 16, width, padded=True, seed=1)
    started = time.perf_counter()
    batch.extend(joining)
    mx.eval([c.state[:2] for c in batch.caches])
    return 1e3 * keep, 1e3 * (time.perf_counter() - started)


def join_into_holes(decoder: Decoder, batch, width: int) -> float:
    """ms of 16 new rows written into the rows of 16 finished ones (``KVBatch.place``, as the scheduler
    joins rows where others left)."""
    _, joining = prefill(decoder, 16, width, padded=True, seed=2)
    started = time.perf_counter()
    batch.place(joining, [(row, row) for row in range(16)])
    mx.eval([c.state[:2] for c in batch.caches])
    return 1e3 * (time.perf_counter() - started)


def attention_call(rows: int, heads: int, width: int, dim: int, dtype: mx.Dtype, repeat: int = 20) -> dict[str, float]:
    """ms of one decode-step attention call: grouped heads (as mlx-lm calls it), and heads as positions."""
    q = mx.random.normal((rows, heads, 1, dim)).astype(dtype)
    k = mx.random.normal((rows, 1, width, dim)).astype(dtype)
    v = mx.random.normal((rows, 1, width, dim)).astype(dtype)
    first = mx.array(np.random.default_rng(0).integers(0, width // 2, rows))
    mask = mx.arange(width) >= first[:, None, None, None]
    mx.eval(q, k, v, mask)

    def grouped(m):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=m)

    def as_positions(m):
        out = mx.fast.scaled_dot_product_attention(q.reshape(rows, 1, heads, dim), k, v, scale=1.0, mask=m)
        return out.reshape(rows, heads, 1, dim)

    out = {}
    for name, fn, m in (("grouped, mask", grouped, mask), ("grouped, no mask", grouped, None),
                        ("as positions, mask", as_positions, mask)):
        mx.eval(fn(m))
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            mx.eval(fn(m))
            times.append(time.perf_counter() - started)
        out[name] = ms(times)
    return out


@contextmanager
def stock_attention():
    """mlx-lm's own attention entry point instead of ``attention.decode_attention`` while the body runs."""
    gemma4_text.scaled_dot_product_attention = attention.STOCK
    try:
        yield
    finally:
        attention.install()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="e2b-size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--width", type=int, default=850, help="the longest prompt, in tokens")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2, help="pure-Python threads beside the busy run")
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2, 4],
                        help="steps queued before the oldest one's tokens are read (Scheduler: 1)")
    parser.add_argument("--switch-interval", type=float, nargs="+", default=[0.005],
                        help="sys.setswitchinterval values for the busy run (Python's default: 0.005)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    default_interval = sys.getswitchinterval()
    dtype = getattr(mx, args.dtype)
    print(machine(), flush=True)
    started = time.perf_counter()
    decoder = build_decoder(args.preset, dtype)
    text = PRESETS[args.preset]["text"]
    print(f"decoder {args.preset} built in {time.perf_counter() - started:.1f} s", flush=True)
    results = []
    for rows in args.rows:
        for padded in (True, False):
            token, batch = prefill(decoder, rows, args.width, padded)
            pipelined(decoder, token, batch, 3)  # first use of these shapes
            build, sync = synchronous(decoder, token, batch, args.steps)
            piped = {d: pipelined(decoder, token, batch, args.steps, d) for d in args.depth}
            contended = {}
            for interval in args.switch_interval:
                sys.setswitchinterval(interval)
                with busy(args.busy):
                    contended[interval] = {d: pipelined(decoder, token, batch, args.steps, d) for d in args.depth}
            sys.setswitchinterval(default_interval)
            with stock_attention():
                pipelined(decoder, token, batch, 3)
                stock = pipelined(decoder, token, batch, args.steps)
            plain = plain_stream(decoder, args.width, args.steps) if rows == 1 and padded else None
            keep, extend = leave_and_join(decoder, batch, args.width) if rows > 1 else (None, None)
            holes = join_into_holes(decoder, batch, args.width) if rows > 16 else None
            result = dict(rows=rows, width=args.width, padded=padded, python_ms=build, sync_ms=sync,
                          pipelined_ms=piped, busy_threads=args.busy, pipelined_busy_ms=contended,
                          pipelined_stock_attention_ms=stock, mlx_lm_plain_cache_ms=plain, keep_ms=keep,
                          extend16_ms=extend, holes16_ms=holes)
            print(json.dumps(result), flush=True)
            results.append(result)
        for dim in sorted({text["head_dim"], text["global_head_dim"]}):
            for width in sorted({min(args.width, text["sliding_window"]), args.width}):
                timing = attention_call(rows, text["num_attention_heads"], width, dim, dtype)
                result = dict(rows=rows, width=width, head_dim=dim, attention_ms=timing)
                print(json.dumps(result), flush=True)
                results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine(), results=results), indent=2))


if __name__ == "__main__":
    main()
