"""``F.linear`` for a few rows (a decoding step) as one Triton kernel that spreads the weight over the GPU.

A decoding step multiplies B ≤ 32 rows by each weight matrix, so each product is a read of the weight
(GPT-2 small: 1.2 MB for 768→768, 4.7 MB for 768→3072 in bf16) with almost no arithmetic. cuBLAS picks
64-column tiles for these shapes (``nvjet_sm90_tst_64x8_64x16``, H100, 2026-12-05,
``benchmarks/decode_profile.py``): 12 thread blocks for a 768-wide output, 48 for 3072, on a GPU of 132 SMs,
and every such product took ≈ 4.2 µs whatever its size (0.28 TB/s for 768→768; the H100's HBM3 gives 3.35
TB/s), plus a split-K pair (5.1 + 1.6 µs) for 3072→768. Here one program covers ``BLOCK_N`` (16–64)
output columns, so a 768-wide output is read by 48 programs and a 3072-wide one by 96–192, each streaming
its (BLOCK_N, K) slice of W once (:mod:`leanformer.ops._skinny_linear_kernel`).

``linear(x, weight, bias)`` is the entry point: the kernel when :data:`ROUTE` is ``"cuda"`` and
:func:`skinny_supported` accepts the inputs, else ``F.linear`` (the result is the same product, float32
accumulation, rounded once to x's dtype). ``skinny_linear`` runs the kernel or raises ValueError naming the
reason. The op is a ``torch.library.triton_op`` (``leanformer::skinny_linear``), so ``torch.compile`` and
CUDA graphs capture it; under ``TRITON_INTERPRET=1`` it is an opaque ``custom_op`` whose kernel runs in
Triton's interpreter (the CPU tests).

Shapes: x (..., K) with unit stride along K (its rows are read through x.reshape(M, K));
weight (N, K) with unit stride along K; bias (N,) or None → (..., N) in x's dtype. x and weight of one
dtype (float32, bfloat16, float16); M = x.numel() / K ≤ :data:`MAX_ROWS`.

With ``activation`` ("gelu", "gelu_tanh", "relu") the kernel applies it to the rounded product and rounds
again, as ``F.linear`` followed by the eager activation does (the MLP's first product: one launch fewer).

Switches (module attributes, read at each launch): ``ROUTE`` ("never": always ``F.linear``; "cuda", the
default: the kernel where supported, for CUDA tensors; "always": also for CPU tensors under the interpreter, for tests),
``TILES`` ("narrow" or "wide": the rule :func:`launch_config` follows), ``BLOCK_N`` / ``BLOCK_K`` /
``NUM_WARPS`` / ``NUM_STAGES`` (None: the heuristic of :func:`launch_config`; a benchmark may set them to
time variants), ``PDL`` (False; True: on Hopper, a programmatic dependent launch: it launches while the
kernel before it ends and waits for it before reading; off until timed), ``FMA_COLUMNS`` (None; 1–8: narrower
column blocks by multiply-adds for a narrow output, :func:`launch_config`; off until timed), ``SPLIT_K`` ("auto",
the default since it was timed on an H100, 2026-12-07; None: off; an int: at most that many parts): under
torch.compile a product with a long K and too few column blocks runs as partial products over parts of K,
:func:`split_linear`, whose sum Inductor fuses into the next kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanformer.ops.fused_decay_attention import (_cdiv, _interpret, _on_device, _register, _triton_import_error,
                                                  _wrap, kernel_reason)

ROUTE = "cuda"  # "cuda": linear() runs the kernel where skinny_supported() allows; "never": always F.linear
# (default "cuda" since the H100 call of 2026-12-06: DiJiang's compiled 8K x 8 step 0.431 -> 0.417 ms, its graph
# path 0.528 -> 0.509, Pre-LN's and SAS-P's graph path at 512 x 1 1% and 2% faster; docs/benchmarks.md)
MAX_ROWS = 32  # rows of x the kernel takes (its BLOCK_M is 16 or 32: tl.dot needs at least 16)
MIN_PROGRAMS = 96  # "wide" tiles: BLOCK_N narrows (64 → 32 → 16) until the output has this many programs
TILES = "wide"  # launch_config's rule for ≤ 16 rows in bf16/fp16: "wide" (the MIN_PROGRAMS rule, 4 warps) or
# "narrow" (BLOCK_N 16, 2 warps). An H100 sweep of each product alone in a CUDA graph (2026-12-06 03:23,
# benchmarks/skinny_linear_gpu.py, 8 rows, docs/gpu/decode_2026-12-06/call1/skinny) found narrow 0.4–1.3 µs
# faster per product; but its repeated product reads a weight that stays in L2. In DiJiang's decoding step,
# where each weight comes from HBM once, narrow gave nothing (H200, 2026-12-06 23:37: 0.389 against 0.390
# ms, docs/gpu/decode_2026-12-06/call4), so the default stays wide
SMEM_BYTES = 160 * 1024  # pipeline stages are cut so that their x and W tiles fit (H100: 227 KB per block); a
# float32 64 × 512 W tile with four stages asked for 320 KB and failed to launch on an H100 (2026-12-06)
BLOCK_N: int | None = None
BLOCK_K: int | None = None
NUM_WARPS: int | None = None
NUM_STAGES: int | None = None
PDL = False  # launch as a programmatic dependent launch on Hopper or newer (module docstring); off until timed
FMA_COLUMNS: int | None = None  # 1, 2, 4 or 8: a product of ≤ 8 rows whose 16-column blocks would give fewer than
# MIN_PROGRAMS programs (GPT-2's 768-wide outputs: 48 programs on a GPU of 132 SMs; its 3072 → 768 product took
# 7.1 µs against 3.7 for 768 → 3072 with the same weight bytes, H100 sweep of 2026-12-06) gets blocks of this
# many columns, multiplied by float32 multiply-adds instead of tl.dot (which needs 16); None: off (not timed)


def launch_config(M: int, N: int, K: int, dtype: torch.dtype, extra_rows: int = 0, fma: bool = False) -> dict:
    """BLOCK_M (16 or 32, ≥ M), BLOCK_N, BLOCK_K (256 for 2-byte dtypes, 128 for float32; at most K rounded up
    to a power of two), warps and pipeline stages (4, cut to what SMEM_BYTES holds, with ``extra_rows`` more
    rows of K tiles per stage: the NOBLE kernel's W_down), each overridable by the module switch of its name.

    BLOCK_N and warps follow :data:`TILES`: "narrow" gives a plain product (``extra_rows`` 0) of
    at most 16 rows in a 2-byte dtype BLOCK_N 16 and 2 warps; otherwise, and always under "wide", BLOCK_N is the
    widest of 64, 32, 16 giving ≥ MIN_PROGRAMS programs (else 16) with 4 warps (the default).

    ``fma`` (the few-row kernel's callers): the result also holds ``FMA``, True when :data:`FMA_COLUMNS` takes
    the product (≤ 8 rows, fewer than MIN_PROGRAMS 16-column blocks, no BLOCK_N set): then BLOCK_M is M rounded
    up to a power of two, BLOCK_N is FMA_COLUMNS and BLOCK_K at most 128 (a float32 block of ≤ 8 × 8 × 128)."""
    if FMA_COLUMNS is not None and FMA_COLUMNS not in (1, 2, 4, 8):
        raise ValueError(f"skinny_linear.FMA_COLUMNS={FMA_COLUMNS!r} must be None, 1, 2, 4 or 8")
    if fma and FMA_COLUMNS and M <= 8 and BLOCK_N is None and _cdiv(N, 16) < MIN_PROGRAMS and not extra_rows:
        block_k = BLOCK_K or min(128, max(16, 1 << (K - 1).bit_length()))
        block_m = 1 << max(0, M - 1).bit_length()
        stages = max(1, min(NUM_STAGES or 4, SMEM_BYTES // ((block_m + FMA_COLUMNS) * block_k * dtype.itemsize)))
        return dict(BLOCK_M=block_m, BLOCK_N=FMA_COLUMNS, BLOCK_K=block_k, num_warps=NUM_WARPS or 2,
                    num_stages=stages, FMA=True)
    if TILES not in ("wide", "narrow"):
        raise ValueError(f"skinny_linear.TILES={TILES!r} must be 'wide' or 'narrow'")
    block_m = 16 if M <= 16 else 32
    narrow = TILES == "narrow" and block_m == 16 and dtype.itemsize == 2 and extra_rows == 0
    block_n = BLOCK_N or (16 if narrow else next((b for b in (64, 32) if _cdiv(N, b) >= MIN_PROGRAMS), 16))
    block_k = BLOCK_K or min(256 if dtype != torch.float32 else 128, max(16, 1 << (K - 1).bit_length()))
    stage_bytes = (block_m + block_n + extra_rows) * block_k * dtype.itemsize
    stages = max(1, min(NUM_STAGES or 4, SMEM_BYTES // stage_bytes))  # x and W tiles of every stage fit
    warps = NUM_WARPS or (2 if narrow else 4)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                **({"FMA": False} if fma else {}))


def skinny_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel cannot run ``F.linear(x, weight, bias)``, or None when it can."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return f"x (..., K) and weight (N, K) do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    reason = kernel_reason(x.device, x.dtype, ())
    if reason is not None:
        return reason
    if weight.dtype != x.dtype or weight.device != x.device:
        return f"weight must be {x.dtype} on {x.device} like x (got {weight.dtype} on {weight.device})"
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != x.device):
        return f"bias must be ({weight.shape[0]},) on {x.device}, got {tuple(bias.shape)} on {bias.device}"
    rows = x.numel() // max(1, x.shape[-1])
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows: the kernel takes 1 to {MAX_ROWS} (a decoding step's batch)"
    if weight.stride(1) != 1 or x.stride(-1) != 1:
        return "weight and x need unit stride along K"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "the kernel has no backward (an input requires grad)"
    return _triton_import_error()


ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "relu": 3}  # the kernel's ACT code of an activation after the product
EAGER_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "relu": F.relu}  # the
# same functions eagerly (also the MLP's table, leanformer.layers.mlp)


def pdl_launch(device: torch.device, switch: bool | None = None) -> bool:
    """Whether a kernel on ``device`` is launched as a programmatic dependent launch: the switch (default
    :data:`PDL`) is on, the device is a CUDA GPU of compute capability 9 or newer, Triton's interpreter is
    off, and the call is not being traced by torch.compile."""
    on = PDL if switch is None else switch
    if not on or device.type != "cuda" or _interpret():
        return False
    # under torch.compile a user kernel's launch options are num_warps and the like: Inductor's launcher has
    # no way to pass launch_pdl (torch 2.13's triton_kernel_wrap), so a compiled step launches as usual
    return not torch.compiler.is_compiling() and torch.cuda.get_device_capability(device)[0] >= 9


def _new_output(x, weight, bias, act=0):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_register("leanformer::skinny_linear", _new_output)
def _skinny_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: int = 0) -> torch.Tensor:
    from leanformer.ops import _skinny_linear_kernel as kern

    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = x.new_empty(M, N)
    cfg = launch_config(M, N, K, x.dtype, fma=True)
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    pdl = pdl_launch(x.device)
    if pdl:
        opts["launch_pdl"] = True
    with _on_device(x):  # the kernel's LayerNorm and residual are off: their pointers are never read
        _wrap(kern.skinny_linear_kernel)[(_cdiv(N, cfg["BLOCK_N"]),)](
            x2, weight, weight, weight, bias if bias is not None else weight, out, out, M, N, K, 0.0,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            out.stride(0), out.stride(1), LN=False, LN_BIAS=False, HAS_BIAS=bias is not None, HAS_RES=False,
            EVEN_K=K % cfg["BLOCK_K"] == 0, INTERPRET=_interpret(), ACT=act, PDL=pdl, **meta, **opts)
    return out.view(*x.shape[:-1], N)


SPLIT_K: int | str | None = "auto"  # split_count's rule (H100, 2026-12-07: GPT-2's 3072 -> 768 at 8 rows 7.17 ->
# 3.97 us; DiJiang's 8K x 8 step 0.409 -> 0.380 ms; docs/benchmarks.md); None: off; an int: at most that many
# parts for each product with too few column blocks (a benchmark's sweep)
SPLIT_K_EAGER = False  # also split outside torch.compile, where the partials' sum is launches of its own (tests)
ITERS_PER_SPLIT = 3  # "auto": K tiles per split (GPT-2's 768-wide inputs take 3 tiles of 256 in ≈ 3.4 µs, H100)


def split_count(M: int, N: int, K: int, dtype: torch.dtype) -> int:
    """How many parts :func:`linear` splits K into (1: no split). Only a product whose column blocks
    (:func:`launch_config`) give fewer than MIN_PROGRAMS programs is split. Under :data:`SPLIT_K` "auto", if
    its K spans more than ITERS_PER_SPLIT tiles, into ⌈tiles / ITERS_PER_SPLIT⌉ parts (GPT-2's 3072 → 768 in
    bf16: 48 programs, 12 tiles of 256 → 4 parts, 192 programs; in float32, with tiles of 128, 768 → 768 is
    split too); under an int, into at most that many. The count is the parts the kernel runs (:func:`_parts`:
    whole tiles each, none empty)."""
    if SPLIT_K is None:
        return 1
    if SPLIT_K != "auto" and (isinstance(SPLIT_K, bool) or not isinstance(SPLIT_K, int) or SPLIT_K < 1):
        raise ValueError(f"skinny_linear.SPLIT_K={SPLIT_K!r} must be None, 'auto' or a positive int")
    cfg = launch_config(M, N, K, dtype)
    tiles = _cdiv(K, cfg["BLOCK_K"])
    if _cdiv(N, cfg["BLOCK_N"]) >= MIN_PROGRAMS:
        return 1
    if SPLIT_K == "auto":
        return 1 if tiles <= ITERS_PER_SPLIT else _parts(M, N, K, dtype, _cdiv(tiles, ITERS_PER_SPLIT))
    return _parts(M, N, K, dtype, SPLIT_K)


def _parts(M: int, N: int, K: int, dtype: torch.dtype, splits: int) -> int:
    """The parts K is cut into for ``splits`` asked: whole BLOCK_K tiles each, none empty (12 tiles asked in 5
    parts: 3 tiles each, 4 parts)."""
    tiles = _cdiv(K, launch_config(M, N, K, dtype)["BLOCK_K"])
    return _cdiv(tiles, _cdiv(tiles, min(splits, tiles)))


def _new_partials(x, weight, splits):
    return x.new_empty(splits, x.numel() // x.shape[-1], weight.shape[0], dtype=torch.float32)


@_register("leanformer::skinny_linear_partials", _new_partials)
def _partials_op(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    from leanformer.ops import _skinny_linear_kernel as kern

    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = _new_partials(x, weight, splits)
    cfg = launch_config(M, N, K, x.dtype)
    k_split = _cdiv(_cdiv(K, cfg["BLOCK_K"]), splits) * cfg["BLOCK_K"]  # whole tiles per part (split_linear
    # passes a count that leaves no part empty: _parts)
    meta = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {} if _interpret() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    with _on_device(x):
        _wrap(kern.skinny_partials_kernel)[(_cdiv(N, cfg["BLOCK_N"]), splits)](
            x2, weight, out, M, N, K, k_split, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1), out.stride(2), EVEN_K=K % cfg["BLOCK_K"] == 0,  # parts: whole tiles
            INTERPRET=_interpret(), **meta, **opts)
    return out


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as ``splits`` float32 partial products over parts of K (one launch:
    :func:`leanformer.ops._skinny_linear_kernel.skinny_partials_kernel`), summed, the bias added in float32 and
    the sum rounded once to x's dtype. Under torch.compile the sum is pointwise work that Inductor fuses into the
    kernel after the product (a decoding step's residual add and LayerNorm), so the split costs no launch."""
    reason = skinny_supported(x, weight, bias)
    if reason is not None:
        raise ValueError(f"split_linear cannot run these inputs: {reason}; use F.linear")
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    parts = _partials_op(x, weight, _parts(x.numel() // x.shape[-1], weight.shape[0], x.shape[-1], x.dtype, splits))
    y = parts.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def activation_code(activation: str | None) -> int:
    """The kernel's ACT code of ``activation`` (None: 0); ValueError naming the choices for another."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of the kernel's: {', '.join(ACTIVATIONS)} or None")
    return ACTIVATIONS.get(activation, 0)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ``activation`` (None, "gelu", "gelu_tanh" or "relu") if given, by
    the kernel (module docstring); ValueError naming why it cannot run."""
    act = activation_code(activation)
    reason = skinny_supported(x, weight, bias)
    if reason is not None:
        raise ValueError(f"skinny_linear cannot run these inputs: {reason}; use F.linear")
    return _skinny_op(x, weight, bias, act)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` then ``activation`` (as :func:`skinny_linear`): by the kernel when
    :data:`ROUTE` allows it ("cuda": CUDA tensors; "always": also CPU tensors under the interpreter) and it can
    run the inputs, else by ``F.linear`` and the eager activation."""
    act = activation_code(activation)
    if ROUTE == "never" or (ROUTE == "cuda" and not x.is_cuda) or skinny_supported(x, weight, bias) is not None:
        y = F.linear(x, weight, bias)
        return EAGER_ACTIVATIONS[activation](y) if activation is not None else y
    if act == 0 and (SPLIT_K_EAGER or torch.compiler.is_compiling()):
        splits = split_count(x.numel() // x.shape[-1], weight.shape[0], x.shape[-1], x.dtype)
        if splits > 1:
            return split_linear(x, weight, bias, splits)
    return _skinny_op(x, weight, bias, act)
