"""Gemma 4 (E2B/E4B) audio → text in MLX: front-end, audio tower, projector, decoder glue."""
