"""Speed and memory benchmarks (``leanformer bench train | attention | decode``).

* :mod:`leanformer.bench.timing` — the shared timer (CUDA events / ``perf_counter``, medians), memory meter
  and results writer (JSON + markdown + PNG).
* :mod:`leanformer.bench.train` — training-step tokens/s, MFU and peak memory per arm.
* :mod:`leanformer.bench.attention` — token-mixer forward+backward time and memory against sequence length.
* :mod:`leanformer.bench.decode` — ms/token and memory against context length and batch.
* :mod:`leanformer.bench.cli` — the ``leanformer bench`` subcommands.
"""
