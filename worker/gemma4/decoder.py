"""Decoder glue: merged embeddings in, greedy tokens out, on mlx-lm's Gemma 4 text model.

mlx-lm's ``Gemma4TextModel`` runs the transformer stack (PLE, KV sharing, proportional
RoPE, sliding/full caches). What it cannot do by itself is the multimodal input step of
the reference (``Gemma4Model.forward``): media placeholders read the pad embedding, text
rows are scaled by sqrt(H) but audio rows are not, and the per-layer inputs use the ids
with placeholders replaced by pad. So we build the embeddings here, already scaled, and
hand them to mlx-lm with its own ``embed_scale`` set to 1.

Arrays are batch-first ``[B, L]`` throughout so that several clips can share a step later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
from mlx_lm.models import gemma4_text

from producer.failures import AudioqError, FailureCode
from worker.gemma4.config import TokenIds


class Decoder:
    def __init__(self, text_model: gemma4_text.Model, tokens: TokenIds):
        self.lm = text_model
        self.stack = text_model.model
        args = text_model.args
        self.embed_scale = args.hidden_size ** 0.5
        self.stack.embed_scale = 1.0  # see module docstring: embeddings arrive scaled
        self.ple_dim = args.hidden_size_per_layer_input
        self.ple_scale = self.ple_dim ** 0.5 if self.ple_dim else 0.0
        self.num_layers = args.num_hidden_layers
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

    def forward(self, x: mx.array, ple: mx.array | None, cache: list) -> mx.array:
        """Final-normed hidden states [B, L, H]; extends ``cache``."""
        return self.stack(None, cache=cache, input_embeddings=x, per_layer_inputs=ple)

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
        hidden = self.forward(x, ple, cache)
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

