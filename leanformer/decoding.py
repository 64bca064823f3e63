"""Static decoding: caches pre-allocated to a maximum length, a fixed-shape one-token step, CUDA graphs.

The eager path (:class:`leanformer.model.DecodeCache`) grows its caches and passes positions as Python
integers, so every step is a new sequence of shapes and host-side decisions: on a GPU it is bound by
Python and kernel launches. Here instead (the design of gpt-fast's static KV cache):

* :class:`StaticCache` holds every layer's decoding state in tensors allocated once, at the first write
  (the prefill), for ``capacity`` tokens: K and V ``(B, H_kv, capacity, D)`` for softmax and shaped
  attention, the running value sum ``(B, H, D)`` (float32) for shaped attention's centring, DiJiang's
  state S ``(B, H, m, d)`` and normaliser n ``(B, H)`` (float32). Later writes are in place.
* The prefill (:meth:`StaticDecoder.prefill`) is eager and chunked: a chunk at positions
  ``s .. s+T-1`` writes its K/V with ``index_copy_`` and attends over the filled prefix ``[:s+T]``
  (the first chunk with FlashAttention's causal kernel); DiJiang's prefill runs its chunk form.
* The step (:meth:`StaticDecoder.step`) is fixed-shape: the position is a device tensor
  (``StaticCache.step_pos``, (1,) int64), K/V are written at it with ``index_copy_``, and the query
  attends over the whole buffer with a mask ``slot <= pos``, so no shape or host value changes from one
  token to the next. Sampling (temperature, top-k, top-p) is part of it (:func:`sample_next`: the
  exponential race ``argmax(p / E)``, E ~ Exp(1), which draws from ``p`` without a host sync).
* On CUDA the step is captured once as a CUDA graph (``torch.cuda.CUDAGraph``) and replayed per token.
  ``compile=True`` first passes the step through ``torch.compile`` (Inductor fuses its element-wise
  kernels) and captures the compiled step in the same graph: fewer, larger kernels, at the price of a
  compilation per shape. (``torch.compile(mode="reduce-overhead")`` was measured too: it skips its CUDA
  graphs because the step mutates its inputs, the cache, and ran 5× slower; see docs/benchmarks.md.)

Attention modules see a static state through the ``positions`` key of their per-layer dict (a
:class:`StaticPositions` shared by every layer) and ``pos``, the new tokens' positions as a (T,) tensor.
On the CPU the same fixed-shape step runs eagerly: the tests hold it equal (float64) to the eager
path and to the full forward pass.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

KV_KEYS = ("k", "v")  # per-layer tensors indexed by position along dim 2: never snapshot


# ---------------------------------------------------------------------------------------------- positions
@dataclass
class StaticPositions:
    """Where the tokens of the current call sit; one object shared by every layer of a :class:`StaticCache`.

    * ``index``: (T,) int64 positions of the new tokens (the graph's device counter during a step).
    * ``end``: a host int: attend over slots ``[:end]`` (prefill), or None: the whole buffer (step).
    * ``mask``: (T, end or capacity) bool, True where a query may attend; None on a first prefill chunk
      (causal attention over the new tokens alone).
    * ``attention``: ``"math"`` (matmul + masked softmax) or ``"sdpa"`` for the masked step.
    * ``capacity``: the cache's length in tokens.
    * ``fresh``: True while a prefill's first chunk runs at position 0 (:func:`starts_afresh`): the layers then
      start their running state (DiJiang's S and n, shaped attention's running sum) from zero instead of
      continuing what the buffers hold, so a cache rewound by :meth:`StaticDecoder.restart` takes a new prompt.
    * ``shared``: tensors every layer needs once per call (rotary cos/sin, 1/(position+1)), made by the
      first layer that asks (:meth:`memo`) and cleared at each call.
    * ``memo_in_compiled``: False while a prefill runs its blocks as separately compiled graphs: there a
      compiled block makes the tensors itself instead of reading them from ``shared`` (else the first block,
      which makes them, and the others, which read them, would need two graphs).
    """

    capacity: int
    index: torch.Tensor | None = None
    end: int | None = None
    mask: torch.Tensor | None = None
    attention: str = "sdpa"
    fresh: bool = False
    shared: dict = field(default_factory=dict)
    memo_in_compiled: bool = True

    def memo(self, key, make):
        """``make()``, computed once per call for all layers under ``key`` (each time inside a compiled block
        when ``memo_in_compiled`` is off)."""
        if not self.memo_in_compiled and torch.compiler.is_compiling():
            return make()
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


def is_static(state: dict | None) -> bool:
    """True for a per-layer state of a :class:`StaticCache` (pre-allocated, written in place)."""
    return state is not None and "positions" in state


MAX_PREFILL_GRAPHS = 4  # prompt lengths whose prefill keeps a CUDA graph (each holds its own memory pool)


def starts_afresh(state: dict | None) -> bool:
    """True for a static state whose call begins a sequence (position 0): its running state is zero, whatever
    the buffers hold from an earlier sequence (:attr:`StaticPositions.fresh`)."""
    return is_static(state) and state["positions"].fresh


def write_kv(state: dict, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Write ``(B, H, T, D)`` tensors in place at ``state["positions"].index`` into ``(B, H, capacity, D)``
    buffers (allocated, zeroed, at the first write); returns the buffers, cut to ``[:end]`` in a prefill."""
    p: StaticPositions = state["positions"]
    out = {}
    for name, new in tensors.items():
        buf = state.get(name)
        if buf is None:
            buf = state[name] = new.new_zeros(*new.shape[:2], p.capacity, new.shape[3])
        buf.index_copy_(2, p.index, new.to(buf.dtype))
        out[name] = buf if p.end is None else buf[:, :, : p.end]
    return out


def store_state(state: dict, key: str, value: torch.Tensor) -> None:
    """``state[key] = value``; in a static state the tensor already there is overwritten in place (its
    address is what a captured CUDA graph reads and writes), and a first one is a private copy."""
    old = state.get(key)
    if not is_static(state):
        state[key] = value
    elif old is None:
        state[key] = value.clone()
    else:
        old.copy_(value)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: StaticPositions) -> torch.Tensor:
    """Causal attention of queries at ``p.index`` over the cached k, v: (B, H, T, D) × (B, H_kv, S, D) →
    (B, H, T, D). ``p.mask`` (T, S) marks the allowed slots; None means S == T, plain causal attention."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    if p.mask is None:  # S == T: causal (for one token too: its one key is allowed), a plain bool for compile
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != H)
    if p.attention == "sdpa" and n_kv == H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask)
    rep = H // n_kv  # grouped-query: the rep query heads of a kv head share one matrix product
    s = q.reshape(B, n_kv, rep * T, D) @ k.transpose(-1, -2)  # (B, H_kv, rep·T, S)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * (1.0 / math.sqrt(D))
    s = s.masked_fill(~p.mask.repeat(rep, 1), float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).view(B, H, T, v.shape[-1])


# ---------------------------------------------------------------------------------------------- cache
class StaticCache:
    """Decoding state of ``batch`` sequences of at most ``capacity`` tokens, pre-allocated (see module doc).

    ``pos``: tokens filled (host int, advanced by each call). In ``fixed_shape`` mode a call takes one
    token at the device position ``step_pos`` and leaves ``pos`` alone (the caller advances both).
    """

    static = True

    def __init__(self, model: nn.Module, batch: int, capacity: int, attention: str = "sdpa"):
        from leanformer.layers.rope import Rotary

        cfg = model.cfg
        cfg.require_causal("a static decoding cache")
        if capacity < 1 or batch < 1:
            raise ValueError(f"StaticCache needs batch >= 1 and capacity >= 1, got batch={batch}, "
                             f"capacity={capacity}")
        if cfg.pos == "learned" and capacity > cfg.max_seq_len:
            raise ValueError(f"static cache capacity {capacity} exceeds max_seq_len={cfg.max_seq_len} "
                             "(learned positions)")
        if attention not in ("math", "sdpa"):
            raise ValueError(f"attention={attention!r} is not valid; choose math or sdpa")
        device = next(model.parameters()).device
        self.batch, self.capacity, self.pos, self.fixed_shape = batch, capacity, 0, False
        self.positions = StaticPositions(capacity, attention=attention)
        self.layers: list[dict] = [{"positions": self.positions} for _ in range(cfg.n_layers)]
        self.step_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(capacity, device=device)
        for m in model.modules():
            if isinstance(m, Rotary):
                m.reserve(capacity)  # the cos/sin tables must exist before a graph is captured

    def begin(self, T: int, batch: int, device: torch.device) -> torch.Tensor:
        """Positions (T,) of a call's new tokens, published to every layer; checks batch and capacity."""
        if batch != self.batch:
            raise ValueError(f"batch of {batch} sequences, but the static cache holds {self.batch}")
        p = self.positions
        p.shared = {}
        p.fresh = not self.fixed_shape and self.pos == 0
        if self.fixed_shape:
            if T != 1:
                raise ValueError(f"a fixed-shape step takes one token per sequence, got {T}")
            p.index, p.end = self.step_pos, None
            p.mask = (self.slots <= self.step_pos)[None, :]
        else:
            end = self.pos + T
            if end > self.capacity:
                raise ValueError(f"{self.pos} cached + {T} new tokens = {end} exceeds the static cache's "
                                 f"capacity of {self.capacity} tokens (make it larger)")
            p.index, p.end = torch.arange(self.pos, end, device=device), end
            p.mask = None if self.pos == 0 else self.slots[None, :end] <= p.index[:, None]
        for state in self.layers:
            state["pos"] = p.index
        return p.index

    def advance(self, T: int) -> None:
        if not self.fixed_shape:
            self.pos += T

    def tensors(self):
        """(layer state, key, tensor) of every cached tensor."""
        for state in self.layers:
            for key, t in state.items():
                if isinstance(t, torch.Tensor) and key != "pos":
                    yield state, key, t

    def memory_bytes(self, filled: bool = True) -> int:
        """Bytes of decoding state: K/V counted up to ``pos`` (``filled``) or at full capacity."""
        total = 0
        for _, key, t in self.tensors():
            if key in KV_KEYS and filled:
                t = t[:, :, : self.pos]
            total += t.numel() * t.element_size()
        return total

    def snapshot(self) -> dict:
        """Copies of the tensors a step updates in place other than K/V (whose slots past ``pos`` are
        rewritten before they are read): taken before warm-up steps, put back by :meth:`restore`."""
        snap = {(id(s), k): t.clone() for s, k, t in self.tensors() if k not in KV_KEYS}
        snap["step_pos"] = self.step_pos.clone()
        return snap

    def restore(self, snap: dict) -> None:
        for s, k, t in self.tensors():
            if k not in KV_KEYS:
                t.copy_(snap[(id(s), k)])
        self.step_pos.copy_(snap["step_pos"])

    def expand(self, batch: int) -> StaticCache:
        """A cache of ``batch`` rows, each a copy of row 0 of this one (benchmarks: one prefill, many rows)."""
        new = object.__new__(StaticCache)
        new.__dict__.update(self.__dict__)
        new.batch, new.positions = batch, StaticPositions(self.capacity, attention=self.positions.attention)
        new.layers = [{"positions": new.positions} for _ in self.layers]
        new.step_pos = self.step_pos.clone()
        for src, dst in zip(self.layers, new.layers):
            for key, t in src.items():
                if isinstance(t, torch.Tensor) and key != "pos":
                    # a copy even at batch 1 (``.contiguous()`` of a 1-row expand would be the row itself)
                    dst[key] = t[:1].expand(batch, *t.shape[1:]).clone(memory_format=torch.contiguous_format)
        return new


# ---------------------------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None)")


TWO_PASS_ARGMAX = True  # sample_next's argmax in two reductions (last_dim_argmax). On since timed alone (H100,
# 2026-12-07, decode_profile.py, DiJiang 8K x 8 compiled, two calls: 0.419 -> 0.413 ms per step, the same tokens;
# docs/gpu/misc_2026-12-07/callF, callG). (With the norms in the products as well it was slower, 2026-12-06.)
ARGMAX_IN_HEAD = False  # greedy decoding: the head's product and the argmax in one kernel
# (leanformer.ops.linear_argmax) where it runs. Off: timed equal to the two-pass argmax (H100, 2026-12-07 02:44,
# DiJiang 8K x 8: 0.413 ms both; docs/gpu/misc_2026-12-07/callG)


def last_dim_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for x (B, V) in two reductions: the maxima of S equal slices of V (B·S rows), then
    the first slice holding the row's maximum. The same index as ``argmax`` (the first maximum; NaN counts
    as the maximum in both), but a long row is spread over S times more programs: Inductor's one-pass
    ``argmax`` over GPT-2's 50,304 logits took 9.9 µs for 8 rows inside the compiled decoding step (H100,
    2026-12-06, ``benchmarks/decode_profile.py``), one program per row. S: the largest of 64, 48, 32, 16
    dividing V with slices of ≥ 512; none: plain ``argmax``."""
    V = x.shape[-1]
    slices = next((s for s in (64, 48, 32, 16) if V % s == 0 and V // s >= 512), 0)
    if x.dim() != 2 or not slices:
        return x.argmax(-1)
    width = V // slices
    best, where = x.view(x.shape[0], slices, width).max(-1)  # (B, S) each: a slice's first maximum
    chosen = best.argmax(-1, keepdim=True)  # (B, 1): the first slice with the row's maximum
    return (chosen * width + where.gather(-1, chosen)).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) int64 from logits (B, V): greedy at ``temperature=0``, else a draw from
    ``softmax(logits / temperature)`` cut to the ``top_k`` largest and the smallest set of mass
    ``>= top_p`` (nucleus, Holtzman et al. 2020). The draw is ``argmax(p / E)``, E ~ Exp(1) i.i.d.: token
    i wins with probability p_i (the exponential race), with no host synchronisation (graph-safe)."""
    argmax = last_dim_argmax if TWO_PASS_ARGMAX else (lambda t: t.argmax(-1))
    if temperature == 0:
        return argmax(logits)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above: the first is always kept
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return argmax(probs / noise)


# ---------------------------------------------------------------------------------------------- decoder
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")  # torch.compile modes for the captured step


class StaticDecoder:
    """Generation over a :class:`StaticCache`: chunked prefill, then fixed-shape steps.

    ``graph``: ``"cuda"`` captures the step with ``torch.cuda.CUDAGraph`` (CUDA only), ``"none"`` runs it
    eagerly (the CPU; tests), ``"auto"`` = ``"cuda"`` on a GPU, else ``"none"``. ``compile``: the step goes
    through ``torch.compile`` (a string names the backend) before capture, in ``compile_mode`` (None: the
    default; ``"max-autotune-no-cudagraphs"`` lets Inductor time Triton matrix products against cuBLAS's and
    fuse element-wise epilogues into them; a mode with CUDA graphs of its own is refused: the step is captured
    here). ``compile_prefill``: the prefill's chunks through ``torch.compile`` forms with dynamic shapes (a
    string names the backend; False, the default: eager), per ``prefill_unit``: ``"model"`` (the default)
    compiles the whole forward as one graph (GPT-2's 8K prompt on an H100, 2026-12-07: DiJiang 17.9 ms against
    37.0 by blocks and 45.8 eager, after ≈ 120 s of compiling; docs/benchmarks.md); ``"blocks"`` compiles
    each block, and blocks of one kind share their graphs (regional compilation: one block's compile serves
    all twelve of GPT-2's, so it compiles faster; the embedding, the final norm and the head stay eager; each
    block's call costs host time: softmax's 8K prefill took 32.6 ms by blocks against 19.5 eager). The whole
    forward: two graphs serve prompts in chunks of ≥ 2 tokens (the cache before its first chunk and after;
    tested on the CPU for softmax, SAS-P and DiJiang; a first chunk after :meth:`restart`, its buffers already
    there, one more); a one-token chunk, a chunk shorter than DiJiang's kernel block or its split-K branch
    compile one more each.
    The blocks: a few more graphs of one block each, the same for any depth (tests/test_decoding.py's prompts
    on the CPU: 5 for softmax, 4 for DiJiang, 9 for SAS-P, whose blocks differ; past dynamo's recompile limit,
    8 by default and shared by the blocks of one class, a further shape runs eagerly, with a warning). Each
    new cache capacity of a rotary model compiles two more (the rotary tables' reserved length is guarded),
    and each block keeps its own rotary tables (n_layers times one table's memory).
    ``prefill_chunk``: tokens per prefill chunk (4096, as ``bench decode`` on a GPU: GPT-2's 8K prompt on an
    H100, eager, DiJiang 45.8 ms by chunks of 4096 against 134.8 by 2048; softmax 19.5 by 4096 against 11.2 in
    one chunk; 2026-12-07, docs/benchmarks.md). ``prefill_graph`` (CUDA only): a prompt that starts the
    cache is replayed from a CUDA graph of the whole prefill for its length, from the second prompt of that
    length on (:meth:`restart` rewinds the cache for the next one): the prefill's host time, most of its wall
    time (DiJiang's compiled 8K prefill: 17.9 ms for 8.3 ms of kernels, H100, 2026-12-07), goes; not timed
    yet. ``attention``:
    the masked step's attention, ``"sdpa"`` (measured faster on an H100) or ``"math"``. The autocast state
    at construction (e.g. bf16) is the one prefill and steps run under. Static tensors: ``ids`` (B, 1) the
    token to feed, ``tokens`` (B, capacity) every token so far, ``logits`` (B, V) the last step's logits.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, graph: str = "auto", attention: str = "sdpa",
                 prefill_chunk: int = 4096, cache: StaticCache | None = None, compile: bool | str = False,
                 compile_mode: str | None = None, compile_prefill: bool | str = False,
                 prefill_unit: str = "model", prefill_graph: bool = False):
        check_sampling(temperature, top_k, top_p)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} is not valid; choose one of "
                             f"{', '.join(map(str, COMPILE_MODES))} (the step is captured as a CUDA graph here, "
                             "so a mode with CUDA graphs of its own is not one)")
        if compile_mode is not None and not compile:
            raise ValueError(f"compile_mode={compile_mode!r} needs compile=True")
        if graph not in ("auto", "cuda", "none"):
            raise ValueError(f"graph={graph!r} is not valid; choose auto, cuda or none")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
        if prefill_unit not in ("blocks", "model"):
            raise ValueError(f"prefill_unit={prefill_unit!r} is not valid; choose blocks or model")
        self.model = model
        self.device = next(model.parameters()).device
        if prefill_graph and self.device.type != "cuda":
            raise ValueError(f"prefill_graph=True needs a CUDA model (CUDA graphs); this one is on {self.device}")
        self.prefill_graph = prefill_graph
        self._prefill_graphs: dict = {}  # prompt length -> "warm" after a first prefill, then (graph, ids, h, cache),
        # or "failed" (not capturable: runs without a graph)
        if graph == "auto":
            graph = "cuda" if self.device.type == "cuda" else "none"
        if graph != "none" and self.device.type != "cuda":
            raise ValueError(f"graph={graph!r} needs a CUDA model; this one is on {self.device}")
        self.graph_kind, self.prefill_chunk = graph, prefill_chunk
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.cache = cache if cache is not None else StaticCache(model, batch, capacity, attention)
        self.batch, self.capacity = self.cache.batch, self.cache.capacity
        dev = self.device.type
        on = torch.is_autocast_enabled(dev) if torch.amp.is_autocast_available(dev) else False
        # The autocast weight-cast cache must stay off: a captured graph would read a freed cast.
        dtype = torch.get_autocast_dtype(dev) if on else None
        self._ctx = ((lambda: torch.autocast(dev, dtype=dtype, cache_enabled=False)) if on else nullcontext)
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(self.batch, self.capacity, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self._graph = None
        self.compiled, self.compile_mode = compile, compile_mode
        backend = compile if isinstance(compile, str) else "inductor"
        self._body = (torch.compile(self._step_body, dynamic=False, backend=backend, mode=compile_mode) if compile
                      else self._step_body)
        self.compile_prefill, self.prefill_unit = compile_prefill, prefill_unit
        prefill_backend = compile_prefill if isinstance(compile_prefill, str) else "inductor"
        self._blocks = None  # the compiled blocks of prefill_unit "blocks"
        self._chunk = self._prefill_chunk
        if compile_prefill and prefill_unit == "model":
            self._chunk = torch.compile(self._prefill_chunk, dynamic=True, backend=prefill_backend)
        elif compile_prefill:
            self._blocks = [torch.compile(b, dynamic=True, backend=prefill_backend) for b in model.blocks]

    # ---------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the cache in chunks; returns the last position's logits (B, V)
        and makes the first sampled token the next one to feed. With ``prefill_graph`` a prompt that starts
        the cache (position 0) runs as a CUDA graph from the second prompt of its length on
        (:meth:`_prefill_replayed`)."""
        B, T = prompt.shape
        if T < 1:
            raise ValueError("the prompt must hold at least one token")
        if self.cache.pos + T > self.capacity:
            raise ValueError(f"prompt of {T} tokens (after {self.cache.pos} cached) exceeds the static "
                             f"cache's capacity of {self.capacity} tokens")
        from leanformer.layers.dijiang import replayed_prompts  # (dijiang imports this module)

        with self._ctx():
            if self.prefill_graph and self.cache.pos == 0:
                with replayed_prompts():  # DiJiang's prompt through fla's gated kernel (dijiang.GATED_FLA_PROMPTS)
                    h = self._prefill_replayed(prompt)
            else:
                h = self._prefill_chunks(prompt)
            logits, nxt = self._head_and_choice(h)
            self.tokens[:, self.cache.pos - T: self.cache.pos] = prompt
        if self.logits is None:
            self.logits = logits.clone()
        else:
            self.logits.copy_(logits)
        self.ids.copy_(nxt[:, None])
        self.step_pos_sync()
        if self.cache.pos < self.capacity:
            self.tokens[:, self.cache.pos] = nxt
        return logits

    def _prefill_chunks(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt (B, T) through the cache, ``prefill_chunk`` tokens at a time → the last position's hidden
        state (B, C)."""
        for s in range(0, prompt.shape[1], self.prefill_chunk):
            ids = prompt[:, s:s + self.prefill_chunk]
            if self.compile_prefill and self._blocks is None and ids.shape[1] > 1:  # one graph for the
                # lengths ≥ 2 (1 is always specialised); "maybe": code that needs a length's value (a
                # short chunk's kernel block) recompiles for it instead of failing
                torch._dynamo.maybe_mark_dynamic(ids, 1)
            h = self._chunk(ids)
        return h[:, -1]

    def _prefill_replayed(self, prompt: torch.Tensor) -> torch.Tensor:
        """A prompt that starts the cache, through a CUDA graph of the whole prefill for its length: the first
        prompt of a length runs as usual (compiling, allocating the cache's buffers), the second runs once more
        so, then is captured (the capture records the launches and sets the cache's Python state, then one
        replay computes), later ones only replay (no host work but the replay: an 8K prefill was bound by its
        launches, docs/benchmarks.md). The graph reads the prompt from a buffer of its own and writes the cache's
        buffers in place; it belongs to this cache (another cache, e.g. one assigned to ``self.cache``, starts
        over) and keeps its intermediate tensors in its own memory pool: at most :data:`MAX_PREFILL_GRAPHS`
        lengths keep a graph (the oldest is dropped, and captured again if its length comes back). Like the
        step's graph, it reads the model's rotary tables where they were at capture: a cache of larger capacity
        made for the same model afterwards reallocates them (:meth:`Rotary.reserve`), so make the largest first."""
        T = prompt.shape[1]
        entry = self._prefill_graphs.get(T)
        if isinstance(entry, tuple) and entry[3] is not self.cache:
            self._prefill_graphs.clear()
            entry = None
        if entry is None:
            self._prefill_graphs[T] = "warm"
            return self._prefill_chunks(prompt)
        if entry == "failed":
            return self._prefill_chunks(prompt)
        if entry == "warm":
            # once more without capturing: the first prompt found the cache's buffers unallocated, this one
            # finds them (the path the graph records: code compiled for it compiles now, not in the capture)
            self._prefill_chunks(prompt)
            self.cache.pos = 0
            ids = prompt.clone()
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            try:
                # the outer stream context restores the current stream even when the capture's own exit
                # raises (a capture that went wrong), so later work does not stay on the capture's stream
                with torch.cuda.stream(side), torch.cuda.graph(g, stream=side):
                    h = self._prefill_chunks(ids)  # advances the cache's position to T, as a prefill does
            except Exception as e:  # noqa: BLE001 - e.g. a host read inside the prefill: run it without a graph
                warnings.warn(f"the prefill of {T} tokens could not be captured as a CUDA graph ({type(e).__name__}: "
                              f"{e}); it runs without one", stacklevel=3)
                self._prefill_graphs[T] = "failed"
                self.cache.pos = 0  # a new sequence again (the captured calls ran no kernel)
                return self._prefill_chunks(prompt)
            finally:
                torch.cuda.current_stream(self.device).wait_stream(side)
            captured = [k for k, v in self._prefill_graphs.items() if isinstance(v, tuple)]
            for old in captured[: max(0, len(captured) - MAX_PREFILL_GRAPHS + 1)]:  # the oldest go (their memory)
                self._prefill_graphs[old] = "warm"
            entry = self._prefill_graphs[T] = (g, ids, h, self.cache)
        g, ids, h, _ = entry
        ids.copy_(prompt)
        g.replay()
        self.cache.pos = T
        return h

    def _prefill_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """One prefill chunk (B, T) through the cache → hidden states (B, T, C) (compiled whole for
        ``prefill_unit="model"``; through the compiled blocks for ``"blocks"``, each making its own rotary
        tables, so that the first block and the others share one graph)."""
        if self._blocks is None:
            return self.model.hidden_states(ids, cache=self.cache)
        p = self.cache.positions
        p.memo_in_compiled = False
        try:
            return self.model.hidden_states(ids, cache=self.cache, blocks=self._blocks)
        finally:
            p.memo_in_compiled = True

    def _head_and_choice(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last positions' hidden states h (B, C) → (logits (B, V), next tokens (B,) int64): greedy through
        :mod:`leanformer.ops.linear_argmax` where :data:`ARGMAX_IN_HEAD` asks and it runs (a plain head,
        the few-row kernel's route), else the head, then :func:`sample_next`."""
        from leanformer.layers.linear import DecodeLinear
        from leanformer.ops.linear_argmax import linear_argmax

        head = self.model.lm_head
        if ARGMAX_IN_HEAD and self.sampling["temperature"] == 0 and type(head) is DecodeLinear:
            both = linear_argmax(h, head.weight, head.bias)
            if both is not None:
                return both
        logits = head(h)
        return logits, sample_next(logits, **self.sampling)

    def step_pos_sync(self) -> None:
        self.cache.step_pos.fill_(self.cache.pos)

    def restart(self) -> None:
        """Forget the sequences: the cache goes back to position 0 (its buffers kept, to be overwritten), so
        the next :meth:`prefill` starts new prompts (and may replay a prefill graph, ``prefill_graph``); a step
        before it is refused. The captured step stays valid: it reads the position from the device."""
        self.cache.pos = 0
        self.step_pos_sync()

    # ---------------------------------------------------------------- step
    def _step_body(self) -> None:
        """Feed ``ids`` at ``step_pos``, write the logits and the sampled next token, advance ``step_pos``."""
        cache = self.cache
        h = self.model.hidden_states(self.ids, cache=cache)
        logits, nxt = self._head_and_choice(h[:, -1])
        self.logits.copy_(logits)
        self.ids.copy_(nxt[:, None])
        cache.step_pos.add_(1)
        self.tokens.index_copy_(1, cache.step_pos.clamp(max=self.capacity - 1), self.ids)

    def _run_fixed(self, fn) -> None:
        self.cache.fixed_shape = True
        try:
            with torch.no_grad(), self._ctx():
                fn()
        finally:
            self.cache.fixed_shape = False

    def capture(self, warmup: int = 3) -> None:
        """Build the step's CUDA graph (a no-op for ``graph="none"``); the cache is left as it was.
        ``warmup`` steps run first on a side stream (and compile the step when ``compile``)."""
        if self.graph_kind == "none" or self._graph is not None:
            return
        if self.logits is None:
            raise RuntimeError("prefill a prompt before capturing the decoding step")
        from leanformer.layers.fused_inputs import refresh_fusion

        for m in self.model.modules():  # compiled or captured code does not re-check the fused products
            refresh_fusion(m)
        snap = self.cache.snapshot()
        ids, logits = self.ids.clone(), self.logits.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run_fixed(self._body)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.cache.restore(snap)
        self.ids.copy_(ids)
        g = torch.cuda.CUDAGraph()
        gen = self.sampling["generator"]
        if gen is not None and gen.device.type == "cuda" and hasattr(g, "register_generator_state"):
            g.register_generator_state(gen)
        with torch.cuda.graph(g):
            self._run_fixed(self._body)
        self._graph = g
        self.cache.restore(snap)
        self.ids.copy_(ids)
        self.logits.copy_(logits)

    def step(self) -> None:
        """One token per sequence: the graph's replay (or the eager fixed-shape step)."""
        if self.logits is None or self.cache.pos == 0:  # never prefilled, or emptied by restart()
            raise RuntimeError("prefill a prompt before decoding steps (the cache is empty: a new one, or after "
                               "restart())")
        if self.cache.pos + 1 > self.capacity:
            raise ValueError(f"the static cache is full ({self.capacity} tokens); make it larger")
        if self._graph is not None:
            self._graph.replay()
        else:
            self._run_fixed(self._body)
        self.cache.pos += 1

    def expanded(self, batch: int) -> StaticDecoder:
        """A decoder of ``batch`` rows, each a copy of row 0 of this prefilled one, with the same settings
        (benchmarks: one prefill, many batch sizes). Not captured yet."""
        if self.logits is None:
            raise RuntimeError("prefill a prompt before expanding the decoder")
        new = StaticDecoder(self.model, batch, self.capacity, graph=self.graph_kind,
                            prefill_chunk=self.prefill_chunk, cache=self.cache.expand(batch),
                            compile=self.compiled, compile_mode=self.compile_mode,
                            compile_prefill=self.compile_prefill, prefill_unit=self.prefill_unit,
                            prefill_graph=self.prefill_graph, **self.sampling)
        new.ids.copy_(self.ids[:1].expand(batch, 1))
        new.tokens.copy_(self.tokens[:1].expand(batch, -1))
        new.logits = self.logits[:1].expand(batch, -1).clone()
        new.step_pos_sync()
        return new

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """(B, T) prompt → (B, T + max_new_tokens): prefill, capture, ``max_new_tokens − 1`` steps."""
        B, T = prompt.shape
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if self.cache.pos + T + max_new_tokens > self.capacity:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens = {T + max_new_tokens} "
                             f"exceeds the static cache's capacity of {self.capacity} tokens")
        start = self.cache.pos
        if max_new_tokens == 0:
            return prompt.clone()
        self.prefill(prompt)
        self.capture()
        for _ in range(max_new_tokens - 1):
            self.step()
        return self.tokens[:, start: start + T + max_new_tokens].clone()


# ---------------------------------------------------------------------------------------------- dtype
def decoding_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of ``model`` with its weights in ``dtype`` for fast decoding (no per-step autocast casts),
    except buffers and DiJiang's feature-map and decay tensors, which stay float32 (they feed ``exp``).
    NOBLE layers compute their main and branch products separately (``fused=False``: same result, no
    per-call concatenation of the weights, which a one-token step would pay for in full). The linears
    of an attention layer that read the same input (q, k, v; DiJiang's gate) run as one product
    (:func:`leanformer.layers.fused_inputs.fuse_linears`: their weights become views of one matrix). Plain
    linears become :class:`leanformer.layers.linear.DecodeLinear` (the same map, through the few-row kernel
    of :mod:`leanformer.ops.skinny_linear` where its ``ROUTE`` allows), NOBLE layers run a step's rows
    through :mod:`leanformer.ops.noble_decode` where its ``ROUTE`` allows (an attention layer's input NOBLE
    layers as one launch, :func:`leanformer.layers.fused_inputs.fuse_noble_linears`), and Pre-LN blocks of
    softmax or DiJiang attention with LayerNorms become :class:`leanformer.blocks.standard.DecodePreLNBlock`
    (their norms and residual sums inside the products, :mod:`leanformer.ops.norm_linear`, where its ``ROUTE``
    allows)."""
    import copy

    from leanformer.blocks.standard import DecodePreLNBlock, PreLNBlock
    from leanformer.layers.attention import SoftmaxAttention
    from leanformer.layers.dijiang import DiJiangAttention, DiJiangFeatureMap
    from leanformer.layers.fused_inputs import fuse_linears, fuse_noble_linears
    from leanformer.layers.linear import DecodeLinear
    from leanformer.layers.noble import NobleLinear

    out = copy.deepcopy(model).to(dtype)
    for m in out.modules():
        if isinstance(m, NobleLinear):
            m.fused = False
            m.decode_kernel = True  # one launch per layer where noble_decode.ROUTE allows (ops/noble_decode.py)
            # the shared-z kernel's buffers (noble_decode.SHARED_Z): its counts, left zero by every launch, and
            # the layer's column range
            dev = m.weight.device
            m.register_buffer("decode_sync", torch.zeros(3, dtype=torch.int32, device=dev), persistent=False)
            m.register_buffer("decode_offsets", torch.tensor([0, m.out_features], dtype=torch.int32, device=dev),
                              persistent=False)
        if isinstance(m, DiJiangFeatureMap):
            m.float()
        elif isinstance(m, DiJiangAttention) and getattr(m, "decay_logit", None) is not None:
            m.decay_logit.data = m.decay_logit.data.float()
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(m, name, b.float())
    for m in out.modules():
        if type(m) is nn.Linear:
            m.__class__ = DecodeLinear
        elif (type(m) is PreLNBlock and type(m.attn) in (SoftmaxAttention, DiJiangAttention)
              and all(type(n) is nn.LayerNorm and n.weight is not None for n in (m.norm1, m.norm2))):
            m.__class__ = DecodePreLNBlock  # norms and residuals handed to the products (ops/norm_linear.py)
    for m in out.modules():
        if hasattr(m, "input_linears"):
            fuse_linears(m, m.input_linears()) or fuse_noble_linears(m, m.input_linears())
    return out
