"""Rotary position embedding (Su et al. 2021), full or partial (GPT-NeoX ``rotary_pct``).

Uses the GPT-NeoX / Llama "rotate half" layout: the first ``rotary_dim`` channels of each head are
split in two halves ``(x1, x2)`` and rotated as ``(x1 cos - x2 sin, x2 cos + x1 sin)``; the remaining
channels pass through unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def scale_frequencies(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Context-extension rescaling of the rotary frequencies (``model.rope_scaling``).

    * ``{"type": "linear", "factor": f}``: position interpolation (Chen et al. 2023), ω / f.
    * ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}``: Llama 3.1's rule: wavelengths longer than
      ``original / low_freq_factor`` are divided by ``factor``, shorter than ``original / high_freq_factor``
      kept, and those between interpolated linearly in ``original / wavelength``.
    """
    if not scaling:
        return inv_freq
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    original = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


COMPILED_TABLES = "op"  # how a compiled training graph builds the tables: "op" (rotary_tables, opaque to Inductor) or
# "inline" (the form before 2026-12-07 23:30, kept for benchmarks: Inductor recomputes them in every rotation's kernel)


def _tables(inv_freq: torch.Tensor, start: int, end: int, dtype: torch.dtype,
            reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(end − start, 2 · len(inv_freq))`` in ``dtype`` for positions ``start .. end−1``, from the
    frequencies ``inv_freq`` (float64, on the tables' device), computed in float64 then rounded; ``reduced``: cos
    and sin in float32 of the angle reduced modulo 2π in float64 (:data:`COMPILED_TABLES` "inline", the compiled
    tables before 2026-12-07, kept for benchmarks: within 1e-6 of float64's)."""
    freqs = torch.outer(torch.arange(start, end, device=inv_freq.device, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    if reduced:
        emb = torch.remainder(emb, 2 * math.pi).float()
    return emb.cos().to(dtype), emb.sin().to(dtype)


@torch.library.custom_op("leanformer::rotary_tables", mutates_args=())
def rotary_tables(inv_freq: torch.Tensor, start: int, end: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tables` as one op that a compiled graph cannot see into, so the tables are built once per layer,
    exactly as the eager ones, and read by the rotations. Inlined, Inductor fused part of their computation (a
    float64 angle, its remainder modulo 2π, a cos and a sin) into rotation kernels, once per element of q or k.
    On an H100 the GPT-2 b16 step was the same either way (36.50 against 36.60 ms, callAK, docs/benchmarks.md):
    the op is kept for its exact tables, not for speed."""
    return _tables(inv_freq, start, end, dtype)


@rotary_tables.register_fake
def _(inv_freq, start, end, dtype):  # noqa: ANN001, ANN202
    shape = (end - start, 2 * inv_freq.shape[0])
    return inv_freq.new_empty(shape, dtype=dtype), inv_freq.new_empty(shape, dtype=dtype)


def _is_static_positions(start) -> bool:  # noqa: ANN001 - an int, a SymInt, a tensor or StaticPositions
    """Whether ``start`` is a static cache's positions (:class:`leanformer.decoding.StaticPositions`, which has
    ``memo``); a plain or symbolic int is not asked (dynamo cannot trace ``hasattr`` on a SymInt)."""
    return not isinstance(start, (int, torch.SymInt, torch.Tensor)) and hasattr(start, "memo")


class Rotary(nn.Module):
    """Rotates ``(B, H, T, D)`` queries and keys at absolute positions ``start .. start+T-1``, or at the
    positions held in a (T,) int64 tensor (static decoding: a device counter read inside a CUDA graph)."""

    def __init__(self, head_dim: int, rotary_pct: float = 1.0, theta: float = 10000.0,
                 scaling: dict | None = None):
        super().__init__()
        self.rotary_dim = int(head_dim * rotary_pct)
        # A fixed float64 table kept on the CPU as a plain attribute, not a buffer: it is real under
        # ``with torch.device("meta")`` (``from_pretrained``) and the cos/sin tables built from it are made
        # on the device of the tensors being rotated.
        with torch.device("cpu"):
            inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim))
            self.inv_freq = scale_frequencies(inv_freq, scaling)
        # the frequencies as Python floats: compiled code builds its tables from them (a constant of the graph),
        # not from the CPU tensor, which a compiled graph took as an input and copied to the GPU at every step
        self._inv_freq_values = tuple(self.inv_freq.tolist())
        self._freq_key = hash(self._inv_freq_values)  # layers with equal tables share them per step
        self._tables: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)
        self._reserved = 0

    def reserve(self, length: int) -> None:
        """Make the next tables cover at least ``length`` positions (a static cache's capacity), so that
        positions given as a tensor never need a table grown inside a captured graph."""
        self._reserved = max(self._reserved, length)

    def cos_sin(self, start: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, rotary_dim)`` cos and sin tables for positions ``start .. start+T-1``.

        Computed in float64, cast to ``dtype`` and kept: later calls (every layer, every step, every decoded
        token) slice the kept tables, which grow by doubling when a position beyond them is asked for.
        """
        end = max(start + length, self._reserved)
        if torch.compiler.is_compiling() and not self._reserved:
            # training under torch.compile: built inside the graph (storing it would make dynamo recompile)
            inv_freq = torch.tensor(self._inv_freq_values, device=device, dtype=torch.float64)  # a graph constant
            if COMPILED_TABLES == "inline":
                return _tables(inv_freq, start, start + length, dtype, reduced=True)  # ops Inductor can fuse
            return torch.ops.leanformer.rotary_tables(inv_freq, start, start + length, dtype)
        cached = self._tables
        if cached is None or cached[0] < end or cached[1].device != torch.device(device) or cached[1].dtype != dtype:
            size = max(end, 2 * cached[0] if cached is not None else 0, 256)
            cached = self._tables = (size, *self._fresh(0, size, device, dtype))
        return cached[1][start:start + length], cached[2][start:start + length]

    def _fresh(self, start: int, end: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(end − start, rotary_dim)`` for positions ``start .. end−1``, computed in float64."""
        return _tables(self.inv_freq.to(device=device, dtype=torch.float64), start, end, dtype)

    def cos_sin_at(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, rotary_dim)`` tables at the positions (T,) int64 (on their device): a gather from tables
        covering :meth:`reserve`'s length, with no host synchronisation."""
        self.cos_sin(0, 1, positions.device, dtype)  # builds (or keeps) the tables
        size = self._tables[0]
        return self._tables[1][:size].index_select(0, positions), self._tables[2][:size].index_select(0, positions)

    def step_tables(self, start, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What a kernel needs to rotate one decoding step at ``start`` (read as :meth:`rotate` reads it) as
        :meth:`rotate` does: cos and sin tables (L, rotary_dim) in ``dtype`` and the (1,) int64 position to
        read in them, or None for row 0. An int ``start`` gives its row (a view, L = 1); a tensor (or static
        positions) gives the whole kept tables (covering :meth:`reserve`'s length) and the tensor itself, so
        that no indexing op runs and a captured graph reads the position on the device."""
        if _is_static_positions(start):
            start = start.index
        if not isinstance(start, torch.Tensor):
            cos, sin = self.cos_sin(start, 1, device, dtype)
            return cos, sin, None
        self.cos_sin(0, 1, start.device, dtype)  # builds (or keeps) the tables
        return self._tables[1], self._tables[2], start

    def rotate(self, x: torch.Tensor, start=0) -> torch.Tensor:
        """``x``: (B, H, T, D) -> same shape, rotated at positions ``start + t`` (``start`` an int), at
        ``start[t]`` (a (T,) int64 tensor of positions), or at ``start.index`` (a static cache's
        :class:`leanformer.decoding.StaticPositions`, whose tables are gathered once per step for all layers)."""
        if self.rotary_dim == 0:
            return x
        if _is_static_positions(start):
            key = ("rope", self.rotary_dim, self._freq_key, x.dtype)
            cos, sin = start.memo(key, lambda: self.cos_sin_at(start.index, x.dtype))
        elif isinstance(start, torch.Tensor):
            cos, sin = self.cos_sin_at(start, x.dtype)
        else:
            cos, sin = self.cos_sin(start, x.shape[-2], x.device, x.dtype)
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        out = x_rot * cos + rotated * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    def forward(self, q: torch.Tensor, k: torch.Tensor, start=0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(q, start), self.rotate(k, start)
