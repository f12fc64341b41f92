"""Decoder glue: merged embeddings in, greedy tokens out, on mlx-lm's Gemma 4 layers.

mlx-lm's ``gemma4_text`` supplies the decoder layers (attention with KV sharing,
proportional RoPE, PLE gating, ``layer_scalar``), their caches and masks. Two things its
``Gemma4TextModel.__call__`` cannot do, so this module walks the layers itself:

- the multimodal input step of the reference (``Gemma4Model.forward``): media placeholders
  read the pad embedding, text rows are scaled by sqrt(H) but audio rows are not, and the
  per-layer inputs use the ids with placeholders replaced by pad;
- the prefill shortcut the reference also takes: KV-shared layers own no cache, so for a
  prompt only the last position needs to go through them (E2B: 20 of 35 layers).

Arrays are batch-first ``[B, L]`` throughout so that several clips can share a step later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
from mlx_lm.models import gemma4_text
from mlx_lm.models.base import create_attention_mask

from producer.failures import AudioqError, FailureCode
from worker.gemma4.config import TokenIds


class Decoder:
    def __init__(self, text_model: gemma4_text.Model, tokens: TokenIds):
        self.lm = text_model
        self.stack = text_model.model
        args = text_model.args
        self.embed_scale = args.hidden_size ** 0.5
        self.ple_dim = args.hidden_size_per_layer_input
        self.ple_scale = self.ple_dim ** 0.5 if self.ple_dim else 0.0
        self.num_layers = args.num_hidden_layers
        self.first_shared = args.num_hidden_layers - args.num_kv_shared_layers
        self.window = args.sliding_window
        self.softcap = args.final_logit_softcapping
        self.tokens = tokens

    def embed(self, ids: mx.array, audio_rows: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """Input embeddings [B, L, H] and per-layer token inputs [B, L, layers, P] for ``ids``.

        ``audio_rows`` [n, H] replace the audio placeholders in order (batch row-major);
        their count must equal the number of placeholders. Without rows (decode steps)
        a placeholder id reads the pad embedding, as in the reference, where media
        features are merged on the prefill step only.
        """
        t = self.tokens
        media = mx.zeros(ids.shape, dtype=mx.bool_)
        for media_id in t.multimodal:
            media = media | (ids == media_id)
        lookup_ids = mx.where(media, t.pad, ids)
        x = self.stack.embed_tokens(lookup_ids) * self.embed_scale

        if audio_rows is not None:
            audio = ids == t.audio
            slots = int(audio.sum().item())
            if slots != audio_rows.shape[0]:
                raise AudioqError(FailureCode.MODEL_ERROR, f"prompt has {slots} audio placeholders "
                                  f"but the encoder gave {audio_rows.shape[0]} rows")
            source = mx.maximum(mx.cumsum(audio.reshape(-1).astype(mx.int32)) - 1, 0)
            gathered = audio_rows.astype(x.dtype)[source].reshape(x.shape)
            x = mx.where(audio[..., None], gathered, x)

        ple = None
        if self.ple_dim:
            ple = self.stack.embed_tokens_per_layer(lookup_ids) * self.ple_scale
            ple = ple.reshape(*ids.shape, self.num_layers, self.ple_dim)
        return x, ple

    def per_layer_inputs(self, x: mx.array, ple: mx.array) -> mx.array:
        """PLE: the token part plus the normed projection of the merged embeddings, [B, L, layers, P]."""
        stack = self.stack
        context = stack.per_layer_model_projection(x) * stack.per_layer_projection_scale
        context = stack.per_layer_projection_norm(context.reshape(ple.shape))
        return (context + ple) * stack.per_layer_input_scale

    def forward(self, x: mx.array, ple: mx.array | None, cache: list, last_only: bool = False) -> mx.array:
        """Final-normed hidden states [B, L, H] (``last_only``: [B, 1, H]); extends ``cache``.

        With ``last_only`` the KV-shared layers run on the last position alone: they only
        read K/V that the earlier layers already computed for every position.
        """
        layers = self.stack.layers
        ple = self.per_layer_inputs(x, ple) if self.ple_dim else None
        first_of_type = {}
        for i, layer in enumerate(layers[: len(cache)]):
            first_of_type.setdefault(layer.layer_type, i)
        masks = {kind: create_attention_mask(x, cache[i], self.window if kind == "sliding_attention" else None)
                 for kind, i in first_of_type.items()}
        shared: list[tuple] = [(None, None)] * len(layers)
        h = x
        for i, layer in enumerate(layers):
            if i == self.first_shared and last_only and h.shape[1] > 1:
                h, ple, masks = self._keep_last(h, ple, shared, masks)
            kv, offset = shared[self.stack.previous_kvs[i]]
            if i >= self.first_shared and last_only and x.shape[1] > 1:
                offset = offset + x.shape[1] - 1  # the RoPE position of the kept query
            h, kv, offset = layer(h, masks[layer.layer_type], cache[i] if i < len(cache) else None,
                                  per_layer_input=None if ple is None else ple[:, :, i, :],
                                  shared_kv=kv, offset=offset)
            shared[i] = (kv, offset)
        return self.stack.norm(h)

    def _keep_last(self, h, ple, shared, masks):
        """Cut to the last query; its masks over the producers' full key sets."""
        kept = {}
        for kind in masks:
            keys, _ = next(pair for (pair, _), layer in zip(shared, self.stack.layers)
                           if pair is not None and layer.layer_type == kind)
            count = keys.shape[2]
            kept[kind] = mx.arange(count) >= count - self.window if kind == "sliding_attention" else None
        return h[:, -1:], None if ple is None else ple[:, -1:], kept

    def logits(self, hidden: mx.array) -> mx.array:
        """Soft-capped logits of the tied head, as the reference computes them."""
        out = self.stack.embed_tokens.as_linear(hidden)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def prefill(self, ids: mx.array, audio_rows: mx.array | None) -> tuple[mx.array, list]:
        """Run the prompt; returns last-position logits [B, V] and the filled KV cache."""
        cache = self.lm.make_cache()
        x, ple = self.embed(ids, audio_rows)
        hidden = self.forward(x, ple, cache, last_only=True)
        return self.logits(hidden[:, -1, :]), cache

    def step(self, token: mx.array, cache: list) -> mx.array:
        """One decode step for tokens [B] → logits [B, V]."""
        x, ple = self.embed(token[:, None])
        return self.logits(self.forward(x, ple, cache)[:, -1, :])

    def greedy(self, ids: list[int], audio_rows: mx.array | None, max_new_tokens: int,
               stop_ids: tuple[int, ...], on_step: Callable[[], None] | None = None) -> Iterator[int]:
        """Yield greedy tokens until a stop id (not yielded) or ``max_new_tokens``.

        The next step is queued (``async_eval``) before the current token is read, so the
        host's bookkeeping overlaps the device's work.
        """
        logits, cache = self.prefill(mx.array([ids]), audio_rows)
        token = mx.argmax(logits, axis=-1)
        mx.async_eval(token)
        for produced in range(max_new_tokens):
            if on_step is not None:
                on_step()
            following = None
            if produced + 1 < max_new_tokens:
                following = mx.argmax(self.step(token, cache), axis=-1)
                mx.async_eval(following)
            value = int(token.item())
            if value in stop_ids:
                return
            yield value
            token = following

