"""Decoder glue: merged embeddings in, logits out, on mlx-lm's Gemma 4 layers, for a batch of rows.

mlx-lm's ``gemma4_text`` supplies the decoder layers (attention with KV sharing,
proportional RoPE, PLE gating, ``layer_scalar``). Two things its
``Gemma4TextModel.__call__`` cannot do, so this module walks the layers itself:

- the multimodal input step of the reference (``Gemma4Model.forward``): media placeholders
  read the pad embedding, text rows are scaled by sqrt(H) but audio rows are not, and the
  per-layer inputs use the ids with placeholders replaced by pad;
- the prefill shortcut the reference also takes: KV-shared layers own no cache, so for a
  prompt only the last position needs to go through them (E2B: 20 of 35 layers).

Every call works on a batch of rows: prompts of different lengths are left-padded, and the
caches and masks of ``KVBatch`` keep each row exact under that padding. Decode steps'
attention goes through ``attention.decode_attention`` (the query heads as positions).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import gemma4_text

from producer.failures import AudioqError, FailureCode
from worker.gemma4 import attention
from worker.gemma4.config import TokenIds
from worker.gemma4.kv_batch import KVBatch


class Decoder:
    def __init__(self, text_model: gemma4_text.Model, tokens: TokenIds):
        attention.install()
        self.lm = text_model
        self.stack = text_model.model
        args = text_model.args
        self.embed_scale = args.hidden_size ** 0.5
        self.ple_dim = args.hidden_size_per_layer_input
        self.ple_scale = self.ple_dim ** 0.5 if self.ple_dim else 0.0
        self.num_layers = args.num_hidden_layers
        self.first_shared = args.num_hidden_layers - args.num_kv_shared_layers
        self.window = args.sliding_window
        self.producer_types = [layer.layer_type for layer in self.stack.layers[:self.first_shared]]
        self.softcap = args.final_logit_softcapping
        self.tokens = tokens
        # ids as the embedding tables read them: every media placeholder reads pad (one gather a step)
        lookup = mx.arange(args.vocab_size)
        media = [i for i in tokens.multimodal if 0 <= i < args.vocab_size]
        if media:
            lookup[mx.array(media)] = tokens.pad
        self.lookup = lookup

    def embed(self, ids: mx.array, audio: list[mx.array | None] | None = None,
              in_prompt: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """Input embeddings [B, L, H] and per-layer token inputs [B, L, layers, P] for ``ids``.

        ``audio[b]`` [n_b, H] replace row b's audio placeholders in order; each row's count
        must equal its number of placeholders (inside ``in_prompt`` [B, L], when given).
        Without ``audio`` (decode steps) a
        placeholder id reads the pad embedding, as in the reference, where media features
        are merged on the prefill step only.
        """
        t = self.tokens
        lookup_ids = self.lookup[ids]
        x = self.stack.embed_tokens(lookup_ids) * self.embed_scale

        if audio is not None:
            slot = ids == t.audio
            if in_prompt is not None:
                slot = slot & in_prompt
            slots = slot.sum(axis=1).tolist()
            for row, (count, rows) in enumerate(zip(slots, audio)):
                given = 0 if rows is None else rows.shape[0]
                if count != given:
                    raise AudioqError(FailureCode.MODEL_ERROR, f"prompt row {row} has {count} audio "
                                      f"placeholders but the encoder gave {given} rows")
            present = [r.astype(x.dtype) for r in audio if r is not None]
            if present:
                merged = mx.concatenate(present) if len(present) > 1 else present[0]
                source = mx.maximum(mx.cumsum(slot.reshape(-1).astype(mx.int32)) - 1, 0)
                x = mx.where(slot[..., None], merged[source].reshape(x.shape), x)

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

    def forward(self, x: mx.array, ple: mx.array | None, batch: KVBatch, last_only: bool = False) -> mx.array:
        """Final-normed hidden states [B, L, H] (``last_only``: [B, 1, H]); extends ``batch``.

        With ``last_only`` the KV-shared layers run on the last position alone: they only
        read K/V that the earlier layers already computed for every position.
        """
        layers = self.stack.layers
        ple = self.per_layer_inputs(x, ple) if self.ple_dim else None
        new = x.shape[1]
        masks = batch.masks(new)
        shortcut = last_only and new > 1
        shared: list[tuple] = [(None, None)] * len(layers)
        h = x
        for i, layer in enumerate(layers):
            if i == self.first_shared and shortcut:
                h, ple = h[:, -1:], None if ple is None else ple[:, -1:]
                masks = {kind: _last_query(mask) for kind, mask in masks.items()}
            kv, offset = shared[self.stack.previous_kvs[i]]
            if i >= self.first_shared and shortcut:
                offset = offset + new - 1  # the RoPE position of the kept query
            h, kv, offset = layer(h, masks[layer.layer_type], batch.caches[i] if i < self.first_shared else None,
                                  per_layer_input=None if ple is None else ple[:, :, i, :],
                                  shared_kv=kv, offset=offset)
            shared[i] = (kv, offset)
        batch.advance(new)
        return self.stack.norm(h)

    def logits(self, hidden: mx.array) -> mx.array:
        """Soft-capped logits of the tied head, as the reference computes them."""
        out = self.stack.embed_tokens.as_linear(hidden)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def prefill(self, prompts: list[list[int]], audio: list[mx.array | None],
                generated: list[list[int]] | None = None) -> tuple[mx.array, KVBatch]:
        """Run left-padded prompts; returns last-position logits [B, V] and their filled caches.

        ``generated[b]`` are tokens row b already produced (a row resumed after a step ran
        out of memory): they follow its prompt, and a placeholder id among them reads pad
        as on a decode step.
        """
        generated = generated or [[] for _ in prompts]
        rows = [p + g for p, g in zip(prompts, generated)]
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        ids = mx.array([[self.tokens.pad] * pad + r for pad, r in zip(pads, rows)])
        in_prompt = mx.array([[False] * pad + [True] * len(p) + [False] * len(g)
                              for pad, p, g in zip(pads, prompts, generated)])
        batch = KVBatch(self.producer_types, pads, self.window)
        x, ple = self.embed(ids, audio, in_prompt)
        hidden = self.forward(x, ple, batch, last_only=True)
        return self.logits(hidden[:, -1, :]), batch

    def step(self, tokens: mx.array, batch: KVBatch) -> mx.array:
        """One decode step for tokens [B] → logits [B, V]."""
        x, ple = self.embed(tokens[:, None])
        return self.logits(self.forward(x, ple, batch)[:, -1, :])


def _last_query(mask: mx.array | str | None) -> mx.array | None:
    """The mask row of the last query (a causal last query sees every key: no mask)."""
    return mask[..., -1:, :] if isinstance(mask, mx.array) else None
