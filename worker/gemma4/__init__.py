"""Gemma 4 (E2B/E4B) audio → text in MLX: front-end, audio tower, projector, decoder glue.

Importing the package sets two MLX CUDA defaults (an operator's own values win), before any
module here touches the device: MLX counts a kernel cache's misses over the process's whole
life and raises "Cache thrashing is happening" into whatever runs once they pass twice the
cache's size, which a worker draining clips of every length for hours reaches however well
its shapes are bucketed (``shapes.py``). With the check off, a miss costs a rebuilt plan,
never a job; the larger convolution cache leaves room for the plans of every tower shape the
buckets allow with CUDA (2 convolutions x 36 lengths x each row count up to 64 ``encode_rows``:
4,608).
"""

import os

os.environ.setdefault("MLX_ENABLE_CACHE_THRASHING_CHECK", "0")
os.environ.setdefault("MLX_CUDA_CONV_CACHE_SIZE", "8192")
