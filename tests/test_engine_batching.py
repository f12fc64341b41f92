"""Batched decoding gives every row the tokens it gets alone, in float32, token for token.

The tiny e2b preset has a sliding window of 8 tokens, so every audio prompt here is far
past it; clips run from 0.3 s to 30 s. Rows join mid-flight (the KV caches of batches of
different lengths are merged: mlx-lm #983) and identical prompts joining at different
steps must not share RoPE offsets or KV-shared keys (mlx-lm #1384, #1396, vllm-mlx #256).
Budgets ignore stop ids where the comparison needs long outputs.
"""

from __future__ import annotations

import dataclasses
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import OutOfMemoryOnce, make_tone
from producer.failures import AudioqError, FailureCode
from producer.settings import Settings
from worker.gemma4.attention import decode_attention
from worker.gemma4.engine import CALL_SIZES, ClipRequest, Engine, Prompt, backend
from worker.gemma4.scheduler import RECOVERY_STEPS, Row, Scheduler
from worker.process import engine_options

SECONDS = [0.3, 1.3, 4.0, 11.0, 30.0]
NEW_TOKENS = 16
PAD_ALL = 8.0  # padding_slack that puts every clip and prompt here in one padded batch, as a GPU may


def feeder(clips: list[ClipRequest]):
    """A stream's feed over a fixed list: up to ``free`` clips a call, each once."""
    pending = list(clips)
    return lambda free: [pending.pop(0) for _ in range(min(free, len(pending)))]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """Pads tower and prefill batches freely: what is checked here is that padding changes no token."""
    return Engine.load(str(tiny_checkpoint("e2b")), padding_slack=PAD_ALL)


@pytest.fixture(scope="module")
def waves():
    return [make_tone(s, freq=180 + 60 * i, seed=i)[:, 0] for i, s in enumerate(SECONDS)]


@pytest.fixture(scope="module")
def prompts(engine, waves):
    audio = [engine.prompt(ClipRequest(w, "Transcribe this audio.", NEW_TOKENS)) for w in waves]
    text = engine.prompt(ClipRequest(None, "Summarise the meeting in one sentence.", NEW_TOKENS))
    return audio + [text]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    return [engine.generate([p], NEW_TOKENS, stop_ids=())[0] for p in prompts]


def test_rows_of_mixed_lengths_decode_as_they_do_alone(engine, prompts, alone):
    assert min(len(p.ids) for p in prompts) > engine.decoder.window
    budgets = [NEW_TOKENS, 5, NEW_TOKENS, 9, NEW_TOKENS, 12]  # rows leave the batch at different steps
    batched = engine.generate(prompts, budgets, stop_ids=())
    assert batched == [a[:n] for a, n in zip(alone, budgets)]


def test_prompts_either_side_of_the_sliding_window_decode_as_they_do_alone(engine):
    window = engine.decoder.window
    rng = np.random.default_rng(7)
    lengths = [3, window - 1, window, window + 1, 5 * window]
    text = [Prompt([2] + rng.integers(110, 400, n - 1).tolist()) for n in lengths]
    alone = [engine.generate([p], NEW_TOKENS, stop_ids=())[0] for p in text]
    assert engine.generate(text, NEW_TOKENS, stop_ids=()) == alone


def test_rows_joining_mid_flight_decode_as_they_do_alone(engine, prompts, alone):
    twice = prompts + [prompts[2]]  # the same prompt, joining at another step
    joins = [0, 3, 5, 9, 1, 2, 11]
    assert engine.generate(twice, NEW_TOKENS, stop_ids=(), joins=joins) == alone + [alone[2]]


def test_a_row_due_after_every_running_row_has_ended_still_runs(engine, prompts, alone):
    """A join step the batch never reaches (its rows end first) holds nothing back for ever."""
    assert engine.generate(prompts[:2], [3, NEW_TOKENS], stop_ids=(), joins=[0, 10]) == [alone[0][:3], alone[1]]


def test_rows_joining_where_others_left_decode_as_they_do_alone(engine, prompts, alone):
    """Rows that finish leave holes in the cache until rows join or holes are half the batch."""
    twice = prompts + [prompts[0], prompts[4]]
    budgets = [2, NEW_TOKENS, 5, NEW_TOKENS, 5, 7, NEW_TOKENS, 4]
    joins = [0, 0, 0, 0, 4, 4, 6, 12]  # each group joins after some of the running rows left
    expected = [a[:n] for a, n in zip(alone + [alone[0], alone[4]], budgets)]
    assert engine.generate(twice, budgets, stop_ids=(), joins=joins) == expected


def test_a_row_joining_where_another_left_takes_its_place(engine, waves, alone):
    """The first late clip is written over the finished row (no other row moves); the second finds no
    hole left and is appended. Both decode as they do alone, over the finished row's old columns."""
    budgets = {2: 3, 3: NEW_TOKENS, 4: NEW_TOKENS, 0: NEW_TOKENS, 1: NEW_TOKENS}
    clips = {i: ClipRequest(waves[i], "Transcribe this audio.", n, tag=i) for i, n in budgets.items()}
    arrivals = {1: [clips[2], clips[3], clips[4]], 8: [clips[0], clips[1]]}  # by feed call: after clip 2 left
    calls, outputs = [], {}

    def feed(free: int) -> list[ClipRequest]:
        calls.append(free)
        return arrivals.pop(len(calls), [])

    stats = engine.stream(feed, lambda clip, out: outputs.__setitem__(clip.tag, out.tokens), stop_ids=())
    assert stats["placed"] == 1 and stats["peak_rows"] == 4
    assert outputs == {i: alone[i][:n] for i, n in budgets.items()}


@pytest.mark.parametrize("lengths", [(40, 30, 12), (40, 5, 30), (40, 30, 3), (20, 10, 22)])
def test_a_row_placed_over_a_finished_one_steps_as_it_does_alone(engine, lengths):
    """Longer or shorter than the finished row, inside the sliding window or past it, at no padding."""
    decoder = engine.decoder
    rng = np.random.default_rng(5)
    running, finished, joining = ([2] + rng.integers(110, 400, n - 1).tolist() for n in lengths)
    _, batch = decoder.prefill([running, finished], [None, None])
    for token in (17, 23):
        decoder.step(mx.array([token, token]), batch)
    _, alone = decoder.prefill([joining], [None])
    batch.place(alone, [(1, 0)])
    assert batch.pads[1] == batch.columns - len(joining)
    assert all(cache.offset.tolist() == batch.lengths() for cache in batch.caches)
    placed = decoder.step(mx.array([5, 99]), batch)[1]
    assert np.abs(np.array(placed) - np.array(decoder.step(mx.array([99]), alone)[0])).max() < 1e-5


def test_a_row_longer_than_the_batch_is_not_placed(engine):
    decoder = engine.decoder
    _, batch = decoder.prefill([[2] + [120] * 9, [2] + [130] * 4], [None, None])
    _, longer = decoder.prefill([[2] + [140] * 10], [None])
    with pytest.raises(ValueError, match="cannot be placed"):
        batch.place(longer, [(1, 0)])


def test_rows_placed_in_holes_keep_the_cache_within_its_budget(engine):
    """Ten rows fill the budget; four leave early (holes, fewer than half). A row with a wider reserve
    that fits 7 rows but not 10 must not be placed beside the holes: the cache would outgrow the budget
    (1,390 of 1,000 tokens when it was). It joins after the holes go, and every row decodes as alone."""
    rng = np.random.default_rng(3)
    budget = 1000

    def row(length: int, new_tokens: int) -> Row:
        return Row([2] + rng.integers(110, 400, length - 1).tolist(), None, new_tokens, frozenset())

    first = [row(50, 50)] + [row(10, 90) for _ in range(5)] + [row(10, 2) for _ in range(4)]  # reserve 100 each
    late = row(52, 88)  # reserve 140: 7 x 140 <= 1000 < 10 x 140
    scheduler = Scheduler(engine.decoder, max_rows=32, max_batch_tokens=budget, prefill_tokens=8192,
                          padding_slack=PAD_ALL)
    pending, outputs = [list(first)], {}

    def feed(free: int) -> list[Row] | None:
        if pending:
            return pending.pop()
        if scheduler.stats["steps"] == 2 and late.joined is None and late not in scheduler.waiting:
            return [late]
        return [] if scheduler.rows or scheduler.waiting else None

    scheduler.run(feed, lambda r, outcome: outputs.__setitem__(id(r), outcome))
    assert late.joined is not None and scheduler.stats["peak_cache_tokens"] <= budget
    for r in first + [late]:
        assert outputs[id(r)] == engine.generate([Prompt(r.ids)], r.budget, stop_ids=())[0]


def test_a_finished_row_does_not_keep_the_cache_wider_than_its_budget(engine):
    """A long prompt that finishes first would otherwise hold its columns while two short ones run on."""
    long = " ".join(["word"] * 300)
    clips = [ClipRequest(None, long, 4, tag="long"), ClipRequest(None, "Say hello.", 200, tag="a"),
             ClipRequest(None, "Say hi.", 200, tag="b")]
    prompts = [engine.prompt(c) for c in clips]
    budget = 3 * max(len(p.ids) + c.max_new_tokens for p, c in zip(prompts, clips))
    outputs = {}
    stats = engine.stream(feeder(clips), lambda clip, outcome: outputs.__setitem__(clip.tag, outcome),
                          stop_ids=(), max_batch_tokens=budget)
    assert [len(outputs[t].tokens) for t in ("long", "a", "b")] == [4, 200, 200] and stats["peak_rows"] == 3
    assert stats["peak_cache_tokens"] <= budget


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (4, 2)])
def test_decode_attention_with_heads_as_positions_is_the_grouped_attention(heads, kv_heads):
    rng = np.random.default_rng(3)
    rows, width, dim = 5, 37, 64
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32))
               for shape in ((rows, heads, 1, dim), (rows, kv_heads, width, dim), (rows, kv_heads, width, dim)))
    mask = mx.arange(width) >= mx.array([0, 3, 9, 20, 36])[:, None, None, None]
    for m in (mask, None):
        grouped = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
        assert mx.array_equal(decode_attention(q, k, v, None, scale=0.125, mask=m), grouped)


def test_a_row_dropped_by_its_check_point_leaves_the_others_unchanged(engine, waves):
    clips = [ClipRequest(w, "Transcribe this audio.", 10, tag=i) for i, w in enumerate(waves[:3])]
    expected = [engine.generate([engine.prompt(c)], 10, stop_ids=())[0] for c in clips]
    steps = 0

    def deadline(stage: str) -> None:
        nonlocal steps
        steps += stage == "generate"
        if steps == 4:
            raise TimeoutError("deadline passed")

    clips[1].on_stage = deadline
    outcomes = {}
    engine.stream(feeder(clips), lambda clip, outcome: outcomes.__setitem__(clip.tag, outcome), stop_ids=())
    assert isinstance(outcomes[1], TimeoutError)
    assert [outcomes[0].tokens, outcomes[2].tokens] == [expected[0], expected[2]]


def test_text_only_turns_and_audio_clips_share_a_batch(engine, waves):
    clips = [ClipRequest(None, "Summarise the meeting in one sentence.", 8),
             ClipRequest(waves[1], "Transcribe this audio.", 8),
             ClipRequest(None, "What was decided?", 8),
             ClipRequest(waves[3], "Transcribe this audio.", 8)]
    together = engine.run(clips)
    assert [o.tokens for o in together] == [engine.run([c])[0].tokens for c in clips]
    assert [o.audio_tokens for o in together] == [0, 33, 0, 275]


def test_a_short_output_finishes_while_a_long_one_still_runs(engine, waves):
    long, short, late = (ClipRequest(waves[0], "Transcribe this audio.", n, tag=tag)
                         for n, tag in ((40, "long"), (3, "short"), (3, "late")))
    finished = []
    engine.stream(feeder([long, short, late]), lambda clip, outcome: finished.append(clip.tag), max_rows=2,
                  stop_ids=())
    assert finished == ["short", "late", "long"]


def test_the_batch_stays_within_its_row_and_token_limits(engine, waves):
    prompt_tokens = len(engine.prompt(ClipRequest(waves[2], "Transcribe this audio.", 0)).ids)
    limit = 3 * (prompt_tokens + 6)  # room for three rows of this prompt and 6 new tokens
    running, most = set(), 0

    def watch(i):
        def hook(stage: str) -> None:
            nonlocal most
            if stage == "prefill":
                running.add(i)
                most = max(most, len(running))
        return hook

    clips = [ClipRequest(waves[2], "Transcribe this audio.", 6, watch(i), tag=i) for i in range(8)]
    done = []
    engine.stream(feeder(clips), lambda clip, outcome: (running.discard(clip.tag), done.append(outcome)),
                  max_rows=4, max_batch_tokens=limit)
    assert len(done) == 8 and all(o.tokens for o in done)
    assert most == 3


def test_a_clip_larger_than_the_token_budget_runs_alone(engine, waves):
    clips = [ClipRequest(w, "Transcribe this audio.", 4, tag=i) for i, w in enumerate(waves[3:])]
    outputs = {}
    engine.stream(feeder(clips), lambda clip, outcome: outputs.__setitem__(clip.tag, outcome), max_batch_tokens=10)
    assert [outputs[i].tokens for i in range(2)] == [engine.run([c])[0].tokens for c in clips]


def test_tower_batches_padded_to_shape_buckets_give_the_same_tokens(engine, waves, alone):
    """What the engine does on CUDA (``tower_buckets``), here on the CPU: only padding changes."""
    bucketed = Engine(engine.model, tower_buckets=True, padding_slack=PAD_ALL)
    clips = [ClipRequest(w, "Transcribe this audio.", NEW_TOKENS) for w in waves]
    outputs = []
    bucketed.stream(feeder(clips), lambda clip, out: outputs.append((clips.index(clip), out)), stop_ids=())
    assert [out.tokens for _, out in sorted(outputs, key=lambda pair: pair[0])] == alone[:len(waves)]


def test_on_the_cpu_clips_of_different_lengths_are_not_padded_together(engine, waves, alone):
    """Padding costs its full compute on the CPU and buys nothing there: by default each length runs
    apart (one prefill each), while a GPU's slack pads them into one call."""
    assert CALL_SIZES["cpu"]["padding_slack"] == 1.0
    assert Engine(engine.model).padding_slack == CALL_SIZES[backend()]["padding_slack"]
    clips = [ClipRequest(w, "Transcribe this audio.", NEW_TOKENS, tag=i) for i, w in enumerate(waves)]
    for slack, prefills in ((1.0, len(waves)), (PAD_ALL, 1)):
        outputs = {}
        stats = Engine(engine.model, padding_slack=slack).stream(
            feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out.tokens), stop_ids=())
        assert stats["prefills"] == prefills
        assert [outputs[i] for i in range(len(waves))] == alone[:len(waves)]


@pytest.mark.parametrize("encode_clips, prefill_tokens, towers, prefills", [(2, 8192, 3, 1), (8, 1, 1, 5)])
def test_the_worker_settings_bound_the_engine_s_tower_and_prefill_calls(engine, waves, alone, encode_clips,
                                                                          prefill_tokens, towers, prefills):
    """``batch_encode_clips`` clips a tower call, ``batch_prefill_tokens`` padded tokens a prefill call (one
    prompt always goes, however long), ``batch_padding_slack`` the padding either may carry."""
    settings = Settings(batch_encode_clips=encode_clips, batch_prefill_tokens=prefill_tokens,
                        batch_padding_slack=PAD_ALL)
    clips = [ClipRequest(w, "Transcribe this audio.", NEW_TOKENS, tag=i) for i, w in enumerate(waves)]
    outputs = {}
    stats = Engine(engine.model, **engine_options(settings)).stream(
        feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out.tokens), stop_ids=())
    assert (stats["towers"], stats["prefills"]) == (towers, prefills)
    assert [outputs[i] for i in range(len(waves))] == alone[:len(waves)]


def test_a_padding_slack_below_one_is_refused(engine):
    with pytest.raises(ValueError, match="padding_slack"):
        Engine(engine.model, padding_slack=0.9)


def test_a_front_end_begun_early_gives_the_same_tokens(engine, waves, alone):
    """What a worker does as it queues clips (``start_front_end``): the frames are ready sooner, not different."""
    clips = [ClipRequest(w, "Transcribe this audio.", NEW_TOKENS, tag=i) for i, w in enumerate(waves)]
    for clip in clips[::2]:  # a tower batch of clips begun early and clips not begun
        engine.start_front_end(clip)
    outputs = {}
    engine.stream(feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out.tokens), stop_ids=())
    assert [outputs[i] for i in range(len(waves))] == alone[:len(waves)]


@pytest.mark.parametrize("join_rows, prefills", [(1, 5), (3, 3)])
def test_clips_fed_one_a_step_join_in_groups_of_join_rows(engine, waves, alone, join_rows, prefills):
    """A worker's prefetch hands clips over one at a time; with ``join_rows`` they prefill together.

    Five equal clips, one a step: alone, each joins at the next step (five prefills); in
    threes, the first runs at once, the next three join together, and the last, with no
    company coming, joins when the batch empties (``join_wait`` is long here).
    """
    grouping = Engine(engine.model, join_rows=join_rows, join_wait=60.0)
    clips = [ClipRequest(waves[2], "Transcribe this audio.", NEW_TOKENS, tag=i) for i in range(5)]
    outputs = {}
    stats = grouping.stream(lambda free: [clips.pop(0)] if free and clips else [],
                            lambda clip, out: outputs.__setitem__(clip.tag, out.tokens), stop_ids=())
    assert [outputs[i] for i in range(5)] == [alone[2]] * 5
    assert stats["prefills"] == prefills and stats["rows"] == 5


def test_a_lone_clip_waits_at_most_join_wait_to_join_a_running_batch(engine, waves):
    """No company comes: after ``join_wait`` it joins anyway, while the long row still runs."""
    grouping = Engine(engine.model, join_rows=8, join_wait=0.2)
    long = ClipRequest(waves[0], "Transcribe this audio.", 400, tag="long")
    late = ClipRequest(waves[1], "Transcribe this audio.", 4, tag="late")
    pending, finished = [[long], [late]], []
    stats = grouping.stream(lambda free: pending.pop(0) if free and pending else [],
                            lambda clip, out: finished.append(clip.tag), stop_ids=())
    assert finished == ["late", "long"] and stats["peak_rows"] == 2


def test_a_streams_totals_count_the_time_its_caller_took(engine, waves):
    """``outside``: the seconds the loop spent in the caller's feed and on_done, the worker's measure of the
    engine's idle time, ``idle`` the part of it when nothing ran (``idle_start`` before the first clip,
    ``idle_end`` after the last row, the rest between them); the decode's wait for the device is a part of
    the decode."""
    clips = [ClipRequest(w, "Transcribe this audio.", 4, tag=i) for i, w in enumerate(waves[:2])]
    calls, finished = [], []

    def feed(free):
        calls.append(free)
        if len(calls) == 1:
            time.sleep(0.2)  # the first job still being fetched: nothing runs
            return [clips.pop(0)]
        if len(calls) == 2:
            time.sleep(0.3)  # the caller preparing the next job while a row runs
        if finished == [0] and clips:
            time.sleep(0.3)  # the next job comes after the first one left: nothing runs
            return [clips.pop(0)]
        if len(finished) == 2:
            time.sleep(0.15)  # the caller writing the last results: nothing runs
        return []

    def on_done(clip, outcome):
        finished.append(clip.tag)
        time.sleep(0.1)

    stats = engine.stream(feed, on_done, stop_ids=())
    assert finished == [0, 1] and stats["clips"] == 2
    assert 1.15 <= stats["outside"] < 1.6
    assert 0.65 <= stats["idle"] < 0.8
    assert 0.2 <= stats["idle_start"] < 0.27 and 0.15 <= stats["idle_end"] < 0.3
    assert 0 <= stats["decode_wait"] <= stats["decode"] and stats["steps"] >= 4


def test_warm_up_takes_time_once_and_changes_no_result(engine, prompts, alone):
    seconds = engine.warm_up()
    assert seconds > 0
    assert engine.generate(prompts[:2], NEW_TOKENS, stop_ids=()) == alone[:2]


@pytest.mark.parametrize("limit", ["max_rows", "max_batch_tokens", "prefill_tokens"])
def test_a_limit_below_one_is_refused_instead_of_stalling_the_stream(engine, waves, limit):
    with pytest.raises(ValueError, match=limit):
        engine.stream(lambda free: [ClipRequest(waves[0], "Transcribe.", 2)], lambda clip, outcome: None,
                      **{limit: 0})


def test_a_resumed_row_continues_as_if_it_had_never_stopped(engine, prompts):
    """After a step runs out of memory a row is prefilled again with the tokens it already
    has; a placeholder id among them must read pad, as on a decode step, not ask for audio."""
    prompt = prompts[2]
    produced = [17, engine.model.config.tokens.audio, 230, 41]
    _, batch = engine.decoder.prefill([prompt.ids], [prompt.audio])
    for token in produced[:-1]:
        engine.decoder.step(mx.array([token]), batch)
    stepped = np.array(engine.decoder.step(mx.array([produced[-1]]), batch)[0])
    resumed, _ = engine.decoder.prefill([prompt.ids], [prompt.audio], [produced])
    assert np.abs(np.array(resumed[0]) - stepped).max() < 1e-4


def test_a_prompt_the_model_refuses_fails_alone_in_its_prefill_group(engine, prompts, alone):
    good = prompts[1]  # three prompts of one length: one prefill group
    short = Prompt(good.ids, good.audio[:-1])  # one soft token fewer than placeholders
    outputs = engine.generate([good, short, good], NEW_TOKENS, stop_ids=())
    assert isinstance(outputs[1], AudioqError) and outputs[1].code == FailureCode.MODEL_ERROR
    assert [outputs[0], outputs[2]] == [alone[1], alone[1]]


def test_a_tower_batch_that_runs_out_of_memory_is_split_and_fails_no_clip(engine, waves, alone):
    """As a prefill group is: only a clip whose tower does not fit alone gets the error."""
    tower = OutOfMemoryOnce(engine.model.audio_tower, lambda features, mask: features.shape[0] > 1)
    splitting = Engine(dataclasses.replace(engine.model, audio_tower=tower), padding_slack=PAD_ALL)
    clips = [ClipRequest(w, "Transcribe this audio.", NEW_TOKENS, tag=i) for i, w in enumerate(waves)]
    outputs = {}
    stats = splitting.stream(feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out), stop_ids=())
    assert tower.failures == 1 and stats["out_of_memory"] == 1
    assert [outputs[i].tokens for i in range(len(waves))] == alone[:len(waves)]


def test_a_prefill_that_does_not_fit_beside_running_rows_waits_for_them_to_leave(engine, waves):
    """A row alone in its prefill group is not alone on the device: it runs once the running row has
    left, as rows sent back by a decode step that did not fit do, instead of failing model_error."""
    waiting = Engine(engine.model)
    running = set()
    waiting.decoder.prefill = OutOfMemoryOnce(waiting.decoder.prefill, lambda *args, **kwargs: bool(running))
    long = ClipRequest(waves[1], "Transcribe this audio.", 24, tag="long")
    late = ClipRequest(waves[1], "Transcribe this audio.", 4, tag="late")
    feeds, outcomes = [], {}

    def feed(free):
        feeds.append(free)
        if len(feeds) == 1:
            return [long]
        if len(feeds) == 3:  # the long row decodes: it holds the device
            running.add("long")
            return [late]
        return []

    def on_done(clip, outcome):
        outcomes[clip.tag] = outcome
        running.discard(clip.tag)

    stats = waiting.stream(feed, on_done, stop_ids=())
    assert waiting.decoder.prefill.failures == 1 and stats["out_of_memory"] == 1
    assert len(outcomes["long"].tokens) == 24
    prompt = engine.prompt(ClipRequest(waves[1], "Transcribe this audio.", 4))
    assert outcomes["late"].tokens == engine.generate([prompt], 4, stop_ids=())[0]


def test_a_row_limit_lowered_by_a_step_that_did_not_fit_doubles_back_once_steps_fit(engine, waves):
    """Four rows of a long budget; the first step of four does not fit: two run, and after
    RECOVERY_STEPS steps that fit the other two join them rather than waiting for them to end."""
    recovering = Engine(engine.model, max_rows=4)
    recovering.decoder.step = OutOfMemoryOnce(recovering.decoder.step, lambda tokens, batch: tokens.shape[0] > 2)
    budget = RECOVERY_STEPS + 150
    clips = [ClipRequest(waves[1], "Transcribe this audio.", budget, tag=i) for i in range(4)]
    outputs = {}
    stats = recovering.stream(feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out), stop_ids=())
    assert recovering.decoder.step.failures == 1 and stats["out_of_memory"] == 1
    assert stats["steps"] < 2 * budget - 100  # waiting for the first two to end would take 2 x budget
    prompt = engine.prompt(ClipRequest(waves[1], "Transcribe this audio.", budget))
    assert [outputs[i].tokens for i in range(4)] == [engine.generate([prompt], budget, stop_ids=())[0]] * 4


def test_a_lasting_memory_shortage_fails_no_row_and_is_retried_less_and_less(engine, waves, alone):
    """Every step of more than two rows runs out of memory: the limit is raised back and lowered
    again, each raise waiting twice as long as the last, and every row still gets its tokens."""
    short = Engine(engine.model, max_rows=4)

    def step(tokens, batch, real=short.decoder.step):
        if tokens.shape[0] > 2:
            raise MemoryError("out of memory: more than two rows never fit (injected)")
        return real(tokens, batch)

    short.decoder.step = step
    budget = 5 * RECOVERY_STEPS // 2
    clips = [ClipRequest(waves[1], "Transcribe this audio.", budget, tag=i) for i in range(4)]
    outputs = {}
    stats = short.stream(feeder(clips), lambda clip, out: outputs.__setitem__(clip.tag, out), stop_ids=())
    # at the start, and when raised after 256 steps; the next raise waits 512, by when the first two
    # rows have ended (raised after 256 again, the last two would have joined them and failed a third time)
    assert stats["out_of_memory"] == 2
    prompt = engine.prompt(ClipRequest(waves[1], "Transcribe this audio.", budget))
    assert [outputs[i].tokens for i in range(4)] == [engine.generate([prompt], budget, stop_ids=())[0]] * 4
