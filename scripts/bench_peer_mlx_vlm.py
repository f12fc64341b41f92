"""Benchmark the MLX peer, mlx-vlm's Gemma 4 (``mlx_vlm.models.gemma4``), like bench_engine.py.

What it compares: the same stages that scripts/bench_engine.py times for audioq, run with
mlx-vlm's own objects on the same checkpoint and the same synthetic clips:

* front-end  - mlx-vlm's ``Gemma4AudioFeatureExtractor`` (numpy log-mel) + copy to MLX;
* tower      - ``model.audio_tower`` + ``model.embed_audio`` (what mlx-vlm's
               ``get_input_embeddings`` runs for audio), evaluated;
* prefill    - ``mlx_vlm.generate.generate_step`` (greedy, temperature 0) up to its first
               yielded token, with the audio embeddings of the tower step scattered into the
               prompt by mlx-vlm's ``masked_scatter`` (a thin wrapper hands them in, so the
               tower is not counted twice);
* decode     - the rest of ``generate_step``: it never stops on EOS, so it yields exactly
               ``--max-new-tokens`` tokens, like bench_engine.py's ``stop_ids=()``.

Each is the median of ``--repeat`` runs after one warm-up run. Also printed: mlx-vlm's
stock path (``generate_step`` given the log-mel features, i.e. tower inside prefill) time to
first token, MLX peak memory and peak RSS. The prompt is the Gemma 4 user turn
``<|turn>user\\n<|audio|>INSTRUCTION<turn|>\\n<|turn>model\\n``, expanded and tokenized by
mlx-vlm's ``Gemma4Processor`` (it adds <bos>, and the audio token count,
``ceil(ms / 40)``).

mlx-vlm is NOT an audioq dependency: install it in its own virtual environment, outside the
repo, with the same mlx version as the project venv::

    python3 -m venv /tmp/vlmenv
    /tmp/vlmenv/bin/pip install mlx-vlm==0.7.10 'mlx[cpu]==0.32.4'   # mlx as in .venv

Then, with checkpoints from scripts/make_tiny_checkpoint.py (mlx layout)::

    .venv/bin/python scripts/make_tiny_checkpoint.py /tmp/ck-e2b-audio --preset e2b-audio --layout mlx
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python scripts/bench_engine.py --model /tmp/ck-e2b-audio \\
        --seconds 5 30 --max-new-tokens 64 --repeat 3
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        /tmp/vlmenv/bin/python scripts/bench_peer_mlx_vlm.py --model /tmp/ck-e2b-audio \\
        --seconds 5 30 --max-new-tokens 64 --repeat 3 [--json] [--dump DIR]

Checkpoint adaptation (done on a temporary copy; the original is left alone):
``config.json``'s ``"vision_config": null`` is removed (mlx-vlm builds its vision tower from
that block and fails on null; absent, it builds a default one and then drops it because the
checkpoint has no vision weights), and audio clip bounds (``*.input_min`` etc.) saved with
shape (1,) are declared with the scalar shape () that mlx-vlm's strict loader expects. Every
other file is copied (or the weights symlinked when no reshape is needed).

``--dump DIR`` writes, per clip, mlx-vlm's prompt ids, generated ids and audio embeddings
(``.npy``) for correctness comparisons with audioq on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from bench_common import machine, medians, memory, print_table, synthetic_clip

CLIP_BOUND_SUFFIXES = (".input_min", ".input_max", ".output_min", ".output_max")


def prepare_checkpoint(src: Path, dst: Path) -> list[str]:
    """Copy `src` to `dst` in the form mlx-vlm's loader accepts; returns the changes made."""
    changes = []
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if "vision_config" in config and config["vision_config"] is None:
        del config["vision_config"]
        changes.append("config.json: removed vision_config: null")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in sorted(src.glob("*.safetensors")):
        reshaped = _copy_safetensors_with_scalar_bounds(f, dst / f.name)
        if reshaped:
            changes.append(f"{f.name}: {reshaped} clip bounds of shape (1,) given shape ()")
    return changes


def _copy_safetensors_with_scalar_bounds(src: Path, dst: Path) -> int:
    """Copy a safetensors file, declaring (1,)-shaped clip bounds as scalars; returns how many.

    Only the JSON header changes (same dtype and byte range, so the data is copied as is and
    the header is padded with spaces to its old length): nothing is loaded into memory, so
    the peak-memory figures measure mlx-vlm alone. Without such bounds, `dst` is a symlink.
    """
    with open(src, "rb") as fin:
        size = int.from_bytes(fin.read(8), "little")
        header = json.loads(fin.read(size))
        bad = [k for k, v in header.items()
               if k.endswith(CLIP_BOUND_SUFFIXES) and isinstance(v, dict) and v["shape"] == [1]]
        if not bad:
            dst.symlink_to(src.resolve())
            return 0
        for k in bad:
            header[k]["shape"] = []
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:
            raise ValueError(f"{src}: rewritten header does not fit ({len(text)} > {size} bytes)")
        with open(dst, "wb") as fout:
            fout.write(size.to_bytes(8, "little") + text + b" " * (size - len(text)))
            shutil.copyfileobj(fin, fout, 16 * 2**20)
    return len(bad)


class AudioEmbeddingsModel:
    """The mlx-vlm model with precomputed audio embeddings, for ``generate_step``.

    ``get_input_embeddings`` is mlx-vlm's own text path (token embeddings, per-layer inputs
    with audio positions zeroed) plus its ``masked_scatter`` of the given audio rows: what
    the stock path does after running the tower. Everything else is the wrapped model.
    """

    def __init__(self, model, audio_embeds: mx.array):
        self._model = model
        self._audio = audio_embeds

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_input_embeddings(self, input_ids=None, pixel_values=None, **kwargs):
        from mlx_vlm.models.gemma4.gemma4 import masked_scatter

        kwargs.pop("mask", None)
        out = self._model.get_input_embeddings(input_ids=input_ids, **kwargs)
        where = input_ids == self._model.config.audio_token_id
        where = mx.broadcast_to(mx.expand_dims(where, -1), out.inputs_embeds.shape)
        out.inputs_embeds = masked_scatter(out.inputs_embeds, where,
                                           self._audio.astype(out.inputs_embeds.dtype))
        return out


def front_end(processor, samples: np.ndarray) -> tuple[mx.array, mx.array]:
    result = processor.feature_extractor([samples], sampling_rate=16000, return_attention_mask=True)
    features = mx.array(np.stack(result["input_features"]))
    mask = mx.array(np.stack(result["input_features_mask"]))
    mx.eval(features, mask)
    return features, mask


def tower(model, features: mx.array, mask: mx.array) -> mx.array:
    encoded, _ = model.audio_tower(features, ~mask)  # mlx-vlm's tower takes True = padding
    embeds = model.embed_audio(encoded)
    mx.eval(embeds)
    return embeds


def bench_clip(model, processor, samples, ids: mx.array, max_new_tokens: int) -> dict:
    from mlx_vlm.generate import generate_step

    t0 = time.perf_counter()
    features, mask = front_end(processor, samples)
    t1 = time.perf_counter()
    embeds = tower(model, features, mask)
    t2 = time.perf_counter()
    steps = generate_step(ids, AudioEmbeddingsModel(model, embeds), None, None,
                          max_tokens=max_new_tokens, temperature=0.0)
    started = time.perf_counter()
    tokens = [next(steps)[0]]
    first = time.perf_counter()
    tokens += [t for t, _ in steps]
    done = time.perf_counter()
    produced = len(tokens)
    return {
        "front_end": t1 - t0, "audio_tower": t2 - t1, "prefill": first - started,
        "decode": done - first, "tokens": produced,
        "decode_tok_s": (produced - 1) / (done - first) if produced > 1 else 0.0,
        "_ids": tokens, "_embeds": embeds,
    }


def stock_ttft(model, processor, samples, ids: mx.array) -> float:
    """mlx-vlm's own path: generate_step given log-mel features (tower + prefill), to 1 token."""
    from mlx_vlm.generate import generate_step

    features, mask = front_end(processor, samples)
    started = time.perf_counter()
    steps = generate_step(ids, model, None, None, max_tokens=1, temperature=0.0,
                          input_features=features, input_features_mask=mask)
    next(steps)
    elapsed = time.perf_counter() - started
    steps.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="mlx-layout checkpoint directory")
    parser.add_argument("--seconds", type=float, nargs="*", default=[5.0, 30.0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instruction", default="Transcribe this audio.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dump", help="write prompt ids, generated ids, audio embeddings here")
    args = parser.parse_args(argv)

    import mlx_vlm
    from mlx_vlm.utils import load

    workdir = Path(tempfile.mkdtemp(prefix="peer-ckpt-"))
    try:
        changes = prepare_checkpoint(Path(args.model), workdir / "model")
        started = time.perf_counter()
        model, processor = load(str(workdir / "model"))
        load_seconds = time.perf_counter() - started

        prompt = f"<|turn>user\n<|audio|>{args.instruction.strip()}<turn|>\n<|turn>model\n"
        results = []
        for i, seconds in enumerate(args.seconds):
            samples = synthetic_clip(seconds, i)
            ids = processor(text=[prompt], audio=[samples])["input_ids"]
            audio_tokens = int((ids == model.config.audio_token_id).sum().item())
            bench_clip(model, processor, samples, ids, args.max_new_tokens)  # warm-up
            runs = [bench_clip(model, processor, samples, ids, args.max_new_tokens)
                    for _ in range(args.repeat)]
            stock_ttft(model, processor, samples, ids)  # warm-up
            stock = statistics.median(stock_ttft(model, processor, samples, ids)
                                      for _ in range(args.repeat))
            median = medians(runs)
            results.append({"clip": f"{seconds:g}s synthetic", "audio_seconds": samples.size / 16000,
                            **median, "audio_tokens": audio_tokens, "prompt_tokens": ids.shape[1],
                            "stock_tower_prefill": stock, "first_tokens": runs[-1]["_ids"][:8]})
            if args.dump:
                out = Path(args.dump)
                out.mkdir(parents=True, exist_ok=True)
                stem = f"{seconds:g}s"
                np.save(out / f"{stem}_audio_embeds.npy", np.array(runs[-1]["_embeds"][0]))
                (out / f"{stem}.json").write_text(json.dumps(
                    {"prompt_ids": ids[0].tolist(), "generated": runs[-1]["_ids"]}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report = {
        "system": f"mlx-vlm {mlx_vlm.__version__}",
        "model": args.model,
        "checkpoint_changes": changes,
        "machine": machine(),
        "load_seconds": load_seconds,
        "clips": results,
        **memory(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"system: {report['system']}\nmodel: {args.model}\nmachine: {report['machine']}\n"
          f"load: {load_seconds:.2f} s\ncheckpoint changes: {'; '.join(changes) or 'none'}")
    print_table(results)
    for r in results:
        print(f"{r['clip']}: {r['audio_tokens']} audio tokens, {r['prompt_tokens']} prompt tokens; "
              f"stock generate_step tower+prefill {r['stock_tower_prefill'] * 1e3:.1f} ms; "
              f"first tokens {r['first_tokens']}")
    print(f"peak MLX memory: {report['peak_mlx_memory_mb']:.1f} MB; peak RSS: {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
