"""``leanformer bench attention``: token-mixer forward+backward time and memory against sequence length.

Inputs q, k, v: (B, H, T, D) (after projections and RoPE), a random output gradient; one call =
forward + backward to q, k, v (and the mixer's own parameters). Methods:

* ``softmax`` — ``F.scaled_dot_product_attention(is_causal=True)``; on CUDA in bf16/fp16 restricted to the
  FlashAttention backend (falls back to the default choice where it cannot run).
* ``shaped`` — shaped attention, fast form (He & Hofmann 2024, Eq. 5 without a T×T matrix:
  ``α v + β SDPA − γ · running mean``), :func:`leanformer.layers.shaped.shaped_attention`.
* ``dijiang_parallel`` / ``dijiang_chunk`` / ``dijiang_fla`` / ``dijiang_fused`` — DiJiang's mixer exactly
  as the model runs it: the ``paper`` feature map and its stabilisers (:meth:`DiJiangAttention.features`: DCT
  projection, exp, running log-normaliser; compiled on CUDA), then the decayed linear attention in the
  masked-T×T, chunkwise (pure PyTorch), fla Triton or our fused Triton form (:meth:`DiJiangAttention.mix`;
  for fla, the exact shift, its range check and rescale included; fused: flash-style, no T×T tensor,
  CUDA only, :mod:`leanformer.ops.fused_decay_attention`). The parallel form is skipped where its T×T
  tensors would not fit; the fused form is timed by default on CUDA only (elsewhere on request: it needs
  CUDA, or Triton's interpreter). ``dijiang_official_*``: the same with the ``official`` feature map
  (softmax over the features; timed by default on CUDA as ``dijiang_official_fla`` and
  ``dijiang_official_fused``, on request elsewhere). The GroupNorm and gate that follow
  the mixer in the layer are not included (nor are SDPA's output projection and the rest of its layer).
* ``dijiang_gated`` / ``dijiang_official_gated`` (on request, CUDA with fla): the mix through fla's forward kernel
  with one gate per token, its backward three more forward passes (mode ``gated``,
  :mod:`leanformer.ops.gated_attention`): no range check read back to the host.

Inputs are laid out as the model's projections make them: (B, T, H, D) memory viewed as (B, H, T, D).

Memory: CUDA — peak allocated during one call above what was allocated before (the inputs); CPU —
bytes autograd saves for backward + the output + the input gradients (see
:class:`leanformer.bench.memory.MemoryMeter`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from leanformer.arms import unavailable_reason
from leanformer.bench.machine import run_metadata
from leanformer.bench.memory import MemoryMeter, failure_status, free_device_memory, release
from leanformer.bench.report import Column, Report, fmt_float, fmt_mib, partial_rows, series
from leanformer.bench.timing import time_fn
from leanformer.config import ConfigError, DiJiangConfig, TransformerConfig
from leanformer.device import resolve_device

METHODS = ("softmax", "shaped", "dijiang_parallel", "dijiang_chunk", "dijiang_fla")
OFFICIAL = ("dijiang_official_parallel", "dijiang_official_chunk", "dijiang_official_fla", "dijiang_official_fused")
GATED = ("dijiang_gated", "dijiang_official_gated")  # fla's forward kernel with one gate per token (H100 2026-12-07:
# 5.93 and 4.77 ms at 4K, a lone call, against SDPA's 1.61; docs/gpu/misc_2026-12-07/callP)
ALL_METHODS = METHODS + ("dijiang_fused",) + OFFICIAL + GATED
CUDA_DEFAULT_EXTRA = ("dijiang_fused", "dijiang_official_fla", "dijiang_official_fused")  # default on CUDA only
CPU_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_methods(spec: str | list[str] | None, device: torch.device | None = None) -> list[str]:
    if spec is None or spec == "all":
        return list(METHODS) + (list(CUDA_DEFAULT_EXTRA) if device is not None and device.type == "cuda" else [])
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in ALL_METHODS]
    if bad or not names:
        raise ConfigError(f"unknown method(s) {', '.join(map(repr, bad)) or repr(spec)}; "
                          f"valid methods: {', '.join(ALL_METHODS)}")
    return ["softmax"] + [n for n in dict.fromkeys(names) if n != "softmax"]


def parse_lengths(spec: str | list[int] | None, device: torch.device) -> list[int]:
    if spec is None:
        return list(GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
    try:
        values = [int(s) for s in spec.split(",")] if isinstance(spec, str) else [int(s) for s in spec]
    except ValueError:
        raise ConfigError(f"--lengths {spec!r} must be comma-separated integers, e.g. 512,2048") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--lengths {spec!r} must be positive integers")
    return values


# ---------------------------------------------------------------------------------------------- methods


def _flash_only(device: torch.device, dtype: torch.dtype):
    """Restrict SDPA to FlashAttention on CUDA in half precision; elsewhere the default choice."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return nullcontext()


def softmax_fn(device: torch.device, dtype: torch.dtype, H: int) -> tuple[Callable, list[torch.Tensor]]:
    def fn(q, k, v):
        with _flash_only(device, dtype):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn, []


def shaped_fn(device: torch.device, dtype: torch.dtype, H: int) -> tuple[Callable, list[torch.Tensor]]:
    from leanformer.layers.shaped import shaped_attention

    # α, β, γ: float32 per-head gains, as in the model
    gains = [torch.ones(H, device=device, requires_grad=True) for _ in range(3)]

    def fn(q, k, v):
        with _flash_only(device, dtype):
            return shaped_attention(q, k, v, *gains)
    return fn, gains


def method_config(method: str, H: int, D: int) -> TransformerConfig:
    """The model config whose attention layer ``method`` is: H heads of D dimensions."""
    if not method.startswith("dijiang_"):
        return TransformerConfig(d_model=H * D, n_heads=H, attention=method).validate()
    feature_map = "official" if method.startswith("dijiang_official_") else "paper"
    dijiang = DiJiangConfig(mode=method.rsplit("_", 1)[1], feature_map=feature_map)
    return TransformerConfig(d_model=H * D, n_heads=H, attention="dijiang", dijiang=dijiang).validate()


def dijiang_fn(cfg: TransformerConfig, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    from leanformer.layers.dijiang import DiJiangAttention

    attn = DiJiangAttention(cfg, 0).to(device)

    def fn(q, k, v):
        return attn.attend(q, k, v, attn.log_gamma(), None)[0]  # the layer's features and mix, as in training
    return fn, [p for p in attn.feature_map.parameters()]


def parallel_bytes(B: int, H: int, T: int, dtype: torch.dtype) -> int:
    """Rough peak of the masked form: the (H, T, T) float32 decay plus ~3 (B, H, T, T) tensors in ``dtype``
    (scores, decayed scores, and one saved for backward), plus their gradients in backward."""
    elem = torch.empty((), dtype=dtype).element_size()
    return H * T * T * 4 * 2 + B * H * T * T * elem * 5


def build_method(method: str, device: torch.device, dtype: torch.dtype, H: int, D: int):
    if method == "softmax":
        return softmax_fn(device, dtype, H)
    if method == "shaped":
        return shaped_fn(device, dtype, H)
    return dijiang_fn(method_config(method, H, D), device)


def captured(call: Callable[[], object]) -> Callable[[], None]:
    """``call`` (forward + backward, gradients set anew inside) captured as one CUDA graph; returns its replay.

    Warmed up on a side stream first, as CUDA graph capture requires. What a compiled training step with
    CUDA graphs (``torch.compile(mode="reduce-overhead")``) pays for the op: the GPU's time without the host's
    launches. An op that reads a value to the host (a sync) cannot be captured: that raises here, with the
    current stream restored (a failed capture leaves the capture stream current, and the next cell would run
    on it). ``call`` must keep no autograd graph of an earlier call alive (its leaves' AccumulateGrad nodes
    remember the stream they were made on: :func:`build_call` returns a detached output); the gradients a
    replay leaves are graph-pool tensors that the next replay overwrites."""
    before = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(before)
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    before.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call()
    finally:
        torch.cuda.set_stream(before)
    return graph.replay


def build_call(method: str, device: torch.device, dtype: torch.dtype, B: int, H: int, T: int, D: int,
               seed: int = 0) -> tuple[Callable, Callable[[], torch.Tensor], list[torch.Tensor]]:
    """The timed call of one cell: (fn, call, leaves). ``call()`` sets the gradients of ``leaves`` (q, k, v,
    then the method's parameters) to None, runs ``fn(q, k, v)`` forward and backward with a fixed random
    output gradient, and returns the output, detached; q, k, v (B, H, T, D) are (B, T, H, D) memory, as the model's
    projections make them, and so is the output gradient."""
    fn, params = build_method(method, device, dtype, H, D)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    leaves = [q, k, v, *params]

    def call() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        out = fn(q, k, v)
        out.backward(grad_out)
        return out.detach()  # no autograd graph outlives the call (see captured)
    return fn, call, leaves


def measure(method: str, device: torch.device, dtype: torch.dtype, B: int, H: int, T: int, D: int, *,
            warmup: int, repeats: int, max_seconds: float | None, seed: int = 0, graphs: bool = False) -> dict:
    """Forward+backward of one method at length T: timing and memory (one row, no ratios). ``graphs``
    (CUDA): time the call replayed from a CUDA graph (:func:`captured`); memory is the eager call's."""
    fn, call, leaves = build_call(method, device, dtype, B, H, T, D, seed)
    q, k, v = leaves[:3]
    call()  # first call: kernels selected / compiled (Triton), lazy buffers
    if device.type == "cuda":
        for t in leaves:
            t.grad = None
        release(device)
        with MemoryMeter(device) as mem:
            call()
        mem_bytes = mem.extra_bytes
    else:
        mem = MemoryMeter(device, saved_tensors=True)
        mem.account(leaves)  # inputs and parameters: not counted as extra
        with mem:
            out = fn(q, k, v)
        # saved for backward (beyond the inputs) + the output + the three input gradients (same shape)
        mem_bytes = mem.extra_bytes + 4 * out.numel() * out.element_size()
        del out
    timed = captured(call) if graphs else call
    timing = time_fn(timed, device, warmup=max(0, warmup - 1), repeats=repeats, max_seconds=max_seconds)
    return {"ms": timing.median_ms, "q1_ms": timing.q1_ms, "q3_ms": timing.q3_ms, "iqr_ms": timing.iqr_ms,
            "repeats": timing.repeats, "mem_bytes": mem_bytes}


def run_attention_bench(*, lengths: str | list[int] | None = None, methods: str | list[str] | None = None,
                        batch: int | None = None, heads: int | None = None, head_dim: int = 64,
                        dtype: str | None = None, device: torch.device | None = None, warmup: int = 2,
                        repeats: int = 5, max_seconds: float | None = 20.0,
                        max_memory_gb: float | None = None, time_budget: float | None = None,
                        graphs: bool = False, command: str = "leanformer bench attention") -> Report:
    """Every method at every length; returns the :class:`Report` (rows: method × length). ``graphs``: each
    call timed as a CUDA graph replay (:func:`captured`; CUDA only)."""
    device = device or resolve_device()
    gpu = device.type == "cuda"
    if graphs and not gpu:
        raise ConfigError(f"--graphs captures each call as a CUDA graph: it needs a CUDA device, not {device.type}")
    lens = parse_lengths(lengths, device)
    names = parse_methods(methods, device)
    B = batch or (4 if gpu else 1)
    H = heads or (12 if gpu else 2)
    dtype_name = dtype or ("bfloat16" if gpu else "float32")
    if dtype_name not in DTYPES:
        raise ConfigError(f"--dtype {dtype_name!r} is not valid; choose one of {', '.join(DTYPES)}")
    dt = DTYPES[dtype_name]
    if min(B, H, head_dim, repeats) < 1:
        raise ConfigError(f"--batch={B}, --heads={H}, --head-dim={head_dim}, --repeats={repeats} "
                          "must be >= 1")
    meta = run_metadata(device, command)
    deadline = time.monotonic() + time_budget if time_budget else None
    rows = partial_rows("attention")
    for T in lens:
        for method in names:
            row = {"method": method, "seq_len": T}
            reason = unavailable_reason(method_config(method, H, head_dim), device)
            free = free_device_memory(device)
            budget = max_memory_gb * 2**30 if max_memory_gb else (0.7 * free if free else None)
            if reason is not None:
                row["status"] = f"unavailable: {reason}"
            elif deadline is not None and time.monotonic() > deadline:
                row["status"] = "skipped (time budget)"
            elif method.endswith("_parallel") and budget is not None and parallel_bytes(B, H, T, dt) > budget:
                row["status"] = "skipped (memory)"
            else:
                try:
                    row.update(measure(method, device, dt, B, H, T, head_dim, warmup=warmup, repeats=repeats,
                                       max_seconds=max_seconds, graphs=graphs))
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - one failing cell must not stop the others
                    row["status"] = failure_status(e)
                release(device)
            rows.append(row)
            print(f"[bench attention] T={T} {method}: {row['status']}"
                  + (f", {row['ms']:.2f} ms" if row["status"] == "ok" else ""), flush=True)
    add_ratios(rows)
    report = Report(
        name="attention", title=f"Attention forward+backward: B={B}, H={H}, D={head_dim}, {dtype_name}",
        meta=meta, rows=rows, columns=ATTENTION_COLUMNS, plot=plot_attention,
        settings={"batch": B, "heads": H, "head_dim": head_dim, "dtype": dtype_name, "lengths": lens,
                  "warmup": warmup, "repeats": repeats, "max_seconds": max_seconds, "graphs": graphs},
        notes=[
            "one call = forward + backward to q, k, v (and the mixer's parameters); median over repeats, "
            "warm-up excluded" + ("; each call replayed from a CUDA graph (GPU time without the host's "
                                  "launches, as a step compiled with CUDA graphs runs it)" if graphs else ""),
            "speed-up = softmax ms / method ms at the same length (>1: faster than softmax)",
            "DiJiang includes its feature map (paper, or official for dijiang_official_*) and stabilisers, "
            "as in the model; not the GroupNorm and gate after it",
            "memory: " + ("CUDA allocator peak during one call, above the inputs" if gpu else
                          "accounted bytes: tensors saved for backward + output + input gradients"),
        ],
    )
    report.finish()
    return report


def add_ratios(rows: list[dict]) -> None:
    base = {r["seq_len"]: r for r in rows if r["method"] == "softmax" and r.get("status") == "ok"}
    for r in rows:
        b = base.get(r["seq_len"])
        if r.get("status") == "ok" and b is not None:
            r["speedup_vs_softmax"] = b["ms"] / r["ms"]
            r["mem_vs_softmax"] = r["mem_bytes"] / b["mem_bytes"] if b["mem_bytes"] else None


ATTENTION_COLUMNS = [
    Column("seq_len", "T"),
    Column("method", "method"),
    Column("ms", "fwd+bwd ms", fmt_float(2)),
    Column("iqr_ms", "IQR ms", fmt_float(2)),
    Column("speedup_vs_softmax", "speed-up vs softmax", fmt_float(2)),
    Column("mem_bytes", "memory (MiB)", fmt_mib),
    Column("mem_vs_softmax", "mem × softmax", fmt_float(2)),
    Column("status", "status", lambda v: "" if v == "ok" else v),
]


def plot_attention(fig, rows: list[dict]) -> None:
    """Log-log: time against length, and memory against length, one line per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for panel, (key, label, scale) in enumerate((("ms", "forward+backward (ms)", 1.0),
                                                 ("mem_bytes", "memory (MiB)", 2.0 ** -20))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for m in methods:
            xs, ys = series(rows, {"method": m, "status": "ok"}, "seq_len", key)
            if xs:
                ax.plot(xs, [y * scale for y in ys], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
