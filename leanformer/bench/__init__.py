"""Speed and memory benchmarks (``leanformer bench train | attention | decode``).

* :mod:`leanformer.bench.timing` — the one timer (CUDA events / ``perf_counter``, medians and quartiles).
* :mod:`leanformer.bench.memory` — peak memory (CUDA allocator, or accounted tensors on CPU; a whole run's).
* :mod:`leanformer.bench.machine` — the machine, versions, date, load average and command of a measurement.
* :mod:`leanformer.bench.report` — the results writer (JSON + markdown + PNG).
* :mod:`leanformer.bench.train` — training-step tokens/s, MFU and peak memory per arm.
* :mod:`leanformer.bench.attention` — token-mixer forward+backward time and memory against sequence length.
* :mod:`leanformer.bench.decode` — ms/token and memory against context length and batch.
* :mod:`leanformer.bench.cli` — the ``leanformer bench`` subcommands.
"""
