"""A fused (flash-style) Triton kernel for the masked part of decayed linear attention, forward and backward.

Per batch row b and head h, with q, k: (B, H, T, m), v: (B, H, T, d), log γ: (H,) and an optional
log-normaliser n: (B, H, T) (see :mod:`leanformer.ops.decayed_linear_attention`, DiJiang eq. 13-14):

    o_i = Σ_{j≤i} exp((i−j)·logγ_h + n_j − n_i) (q_i·k_j) v_j,    i.e.  o = (Q Kᵀ ⊙ Γ) V,

Γ_ij = exp((i−j)·logγ + n_j − n_i) for j ≤ i and 0 above. No T×T matrix is ever stored: each program
holds one block of queries (or keys) and loops over the blocks of the other side up to (from) the diagonal,
recomputing Γ per tile from ``i − j`` and n, masked to −inf above the diagonal *before* ``exp`` (nothing
overflows). Accumulators are float32; the tile ``P = S ⊙ Γ`` is cast to the input dtype for the second
product (as FlashAttention does), so bf16/fp16 inputs run both products on tensor cores. There is no
softmax, hence no row statistics; the backward is

    dV = Pᵀ dO,   dS = (dO Vᵀ) ⊙ Γ,   dQ = dS K,   dK = dSᵀ Q,

in two launches: dK/dV (one program per key block, looping over query blocks from the diagonal on) and dQ
(the forward kernel with (q, k, v) → (dO, v, k)). log γ and n get no gradient here:
:func:`leanformer.ops.decayed_linear_attention.fused` passes a learnable decay's gradient through q and k instead
(:func:`leanformer.ops.constant_decay.route_decay_gradient`) and refuses an n that requires grad.

Factored variant (``FACTORED = True``, the default since its H200 timing of 2026-12-04: fwd+bwd at B 4, H 12,
m = d = 64, bf16, with 3 stages and the longest rows first, 1.13 ms against 1.79 for the per-element kernel at
4K and 17.7 against 25.5 ms at 16K; docs/gpu/fused_2026-12-04b). With a_i = n_i − i·logγ,
Γ_ij = exp(a_j − a_i). When a is non-decreasing, a tile whose keys all precede its queries factors through
a pivot p between them, Γ_ij = exp(a_j − a_p)·exp(a_p − a_i), both factors ≤ 1 (nothing overflows; an
underflowing factor means a smaller product still). Forward and dQ (pivot: the block's first query i0;
key tiles wholly below i0): the key factor scales k (forward) or v (dQ) rows — BLOCK_N exps per tile, not
BLOCK_M·BLOCK_N — the plain products accumulate in a float32 accumulator of their own, whose rows the query
factor scales once at the end. dK/dV (pivot: the block's last key j1, or T − 1 for a partial last block;
query tiles wholly after j1): the query factor scales q alone (it enters dV = (K qᵀ) dO and dK = (V dOᵀ) q
once each; scaling dO too would square it), the key factor the dk, dv rows at the end. Tiles crossing the
diagonal keep the per-element Γ. ``FACTORED_SCALE = "operand"`` casts the scaled rows back to the input
dtype before ``tl.dot`` (one more rounding in bf16/fp16; within the bf16 tests' 3e-2); ``"scores"`` scales
the float32 score tile's columns instead (one multiply per element, no extra rounding). Exponents are
formed from position and n differences, as the per-element Γ is. Precondition, not checked by default:
n − i·logγ non-decreasing, i.e. n a running maximum (DiJiang's
:func:`leanformer.layers.dijiang.running_log_norm`, the only n this library passes: the key maxima's
running maximum under the decay) or no n with logγ ≤ 0 (every decay here is ≤ 0); float32 rounding of n
(~1e-7 relative) only lets a factor reach exp(1e-5). An arbitrary n could overflow a factor:
``CHECK_MONOTONE = True`` checks on the host before each launch (a device sync; the tests set it).

Run-time switches (module attributes, read at each launch, so a benchmark can time variants in one process;
each new combination compiles once per shape; a ``torch.compile``d graph keeps the values it was traced
with): ``BLOCK_M`` / ``BLOCK_N`` (query / key block, 64 / 64; float32 with m or d = 128 caps both at 32, T
below the block shrinks them to the next power of two ≥ 16), ``NUM_WARPS`` (4) and ``NUM_STAGES`` (3;
None: Triton's default), each an int or a tuple (forward, dK/dV, dQ), ``FACTORED`` (True), ``FACTORED_SCALE``
("operand"), ``REVERSE_ROWS`` (True: launches the forward's and dQ's longest query rows first),
``CHECK_MONOTONE`` (False) and ``INTERPRETER_FULL_LOOPS`` (True: under the interpreter, masked loops over
every block; False runs the compiled loop bounds there, which needs numpy < 2.4).

The op is a ``torch.library.triton_op`` (``leanformer::decayed_attention`` and its backward
``leanformer::decayed_attention_bwd``) with ``register_autograd``, so ``torch.compile`` traces the Triton
kernels without a graph break. Triton is imported on the first call, not at import. ``TRITON_INTERPRET=1``
must be in the environment *before this module is imported* to run the kernels in Triton's interpreter on
CPU tensors (tests): the ops are then opaque ``custom_op``s (compile cannot trace an interpreted kernel,
but calls the op: ``torch.compile(fullgraph=True)`` still works). Without it they need CUDA tensors.

Supported (else :func:`fused_supported` says why, and the caller uses the ``parallel`` form): CUDA
tensors on an Ampere or newer GPU, with ≥ 160 KiB of shared memory per block when m or d is 128 (A100,
H100/H200; not sm_86/89) (or CPU tensors under the interpreter); float32, bfloat16 or float16, q, k, v of one dtype;
m and d powers of two in [16, 128] (``tl.dot`` needs ≥ 16; 128 keeps a float32 block within the
shared memory of an A100/H100); any B, H, T ≥ 1 (the last block is masked); any strides (the feature
map's (B, H, T, m) views of (B, T, H, m) memory are read in place). Float32 products run in full IEEE
precision (no TF32). This module does not import the rest of leanformer (the form that uses it,
:func:`leanformer.ops.decayed_linear_attention.fused`, imports it).
"""

import contextlib
import importlib.util
import os

import torch

from leanformer.ops.eager_op import EagerFastOp, direct_call_active

# Run-time switches, read at each launch (a benchmark may time variants side by side in one process;
# each new combination compiles once per shape). The defaults are the fastest variant measured on an H200
# (docs/gpu/fused_2026-12-04b: factored, 3 stages, longest rows first; the first kernel was FACTORED = False,
# NUM_STAGES = None, REVERSE_ROWS = False).
BLOCK_M = 64  # query block (fwd and dQ: a program's queries; dK/dV: the query tiles it loops over)
BLOCK_N = 64  # key block (fwd and dQ: the key tiles; dK/dV: a program's keys). Both: 32 at most for
# float32 with m or d = 128 (shared memory: 64 would need ~210 KiB for dK/dV), and the smallest power of
# two ≥ T (≥ 16) for shorter sequences; no autotuning (the first call costs one compile per shape)
NUM_WARPS: int | tuple[int, int, int] = 4  # an int, or one per kernel: (forward, dK/dV, dQ)
NUM_STAGES: int | None | tuple[int | None, int | None, int | None] = 3  # software-pipelining stages
# (None: Triton's default), or one per kernel as NUM_WARPS
FACTORED = True  # off-diagonal tiles through a pivot (see the module docstring); needs a non-decreasing
# n − i·logγ: DiJiang's running maximum, or no n with logγ ≤ 0
FACTORED_SCALE = "operand"  # factored: "operand" scales k (fwd), v (dQ), q (dK/dV) rows and casts them back
# to the input dtype; "scores" scales the float32 score tile's columns (one multiply per element, no rounding)
REVERSE_ROWS = True  # fwd and dQ: launch the longest query rows (last blocks) first
CHECK_MONOTONE = False  # FACTORED: check the precondition on the host before each launch (a device sync;
# tests and debugging)
INTERPRETER_FULL_LOOPS = True  # interpreter: loop over every block, masked (False: the compiled kernels'
# loop bounds, which Triton 3.6's interpreter runs only with numpy < 2.4, triton-lang/triton#9171)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_DIM, MAX_DIM = 16, 128


_INTERPRET: dict[str, bool] = {}  # "on": TRITON_INTERPRET=1 as first read


@torch.compiler.assume_constant_result
def _interpret() -> bool:
    """TRITON_INTERPRET=1: Triton's CPU interpreter (read at import for the op route; for the launches, once, at
    the first call: Triton itself fixes the mode when it first compiles a kernel, and reading the environment
    at every call cost ~2.5 µs, 13 times per DiJiang call; cached as :func:`_triton_import_error` is)."""
    if "on" not in _INTERPRET:
        _INTERPRET["on"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _INTERPRET["on"]


_TRITON_IMPORT: dict[str, str | None] = {}  # "error": why triton does not import, None when it does


@torch.compiler.assume_constant_result
def _triton_import_error() -> str | None:
    """Checked once (a plain dict, not lru_cache). Under torch.compile the result is a constant of the graph:
    tracing the first check used to leave a guard on the dict that failed at the next call, one recompile of a
    whole compiled model (seen on an H100, docs/gpu/train_2026-12-06/short/steps_log.txt)."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError as e:
            _TRITON_IMPORT["error"] = f"triton is not installed ({e})"
        else:
            _TRITON_IMPORT["error"] = None
    return _TRITON_IMPORT["error"]


def kernel_reason(device: torch.device, dtype: torch.dtype, dims: tuple[tuple[str, int], ...]) -> str | None:
    """What every Triton kernel of ours needs, shared with :mod:`leanformer.ops.fused_decay_step`: CUDA on
    an Ampere or newer GPU (or the CPU under the interpreter), a dtype of :data:`DTYPES`, and each named
    dimension of ``dims`` a power of two in [MIN_DIM, MAX_DIM]. The reason it fails, or None."""
    if device.type != "cuda" and not (device.type == "cpu" and _interpret()):
        return f"needs CUDA tensors (got {device.type}; CPU tensors run only under TRITON_INTERPRET=1)"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (float32, bfloat16, float16)"
    for name, x in dims:
        if x < MIN_DIM or x > MAX_DIM or x & (x - 1):
            return f"{name}={x} must be a power of two in [{MIN_DIM}, {MAX_DIM}]"
    if device.type == "cuda":
        major, minor, _ = _device_limits(device.index if device.index is not None else -1)
        if major < 8:  # Triton's bf16 conversions need sm_80
            return f"needs an Ampere or newer GPU (compute capability ≥ 8.0; this one is {major}.{minor})"
    return None


def fused_reason(device: torch.device, dtype: torch.dtype, m: int, d: int) -> str | None:
    """Why the fused kernel cannot run q, k: (…, m) and v: (…, d) of ``dtype`` on ``device``; None if it can."""
    reason = kernel_reason(device, dtype, (("feature dim m", m), ("value dim d", d)))
    if reason is not None:
        return reason
    if device.type == "cuda":
        smem = _device_limits(device.index if device.index is not None else -1)[2]
        if max(m, d) > 64 and smem < BIG_DIM_SMEM:
            return (f"m or d = {max(m, d)} needs {BIG_DIM_SMEM // 1024} KiB of shared memory per block; this GPU "
                    f"offers {smem // 1024} KiB (m, d ≤ 64 fit)")
    return _triton_import_error()


BIG_DIM_SMEM = 160 * 1024  # dK/dV at m or d = 128 holds ≈ 130 KiB (A100: 163 KiB, H100/H200: 227 KiB; sm_86/89: 99)


@torch.compiler.assume_constant_result
def _device_limits(index: int) -> tuple[int, int, int]:
    """(major, minor, opt-in shared memory per block in bytes) of CUDA device ``index`` (−1: the current one);
    a constant to torch.compile."""
    props = torch.cuda.get_device_properties(index if index >= 0 else torch.cuda.current_device())
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 0
    return props.major, props.minor, int(smem)


def fused_supported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why :func:`decayed_attention` refuses q: (B, H, T, m) with v: (B, H, T, d), or None when it runs them."""
    if q.dtype != v.dtype:
        return f"q and v must have one dtype (got {q.dtype} and {v.dtype})"
    if q.device != v.device:
        return f"q and v must be on one device (got {q.device} and {v.device})"
    return fused_reason(q.device, q.dtype, q.shape[-1], v.shape[-1])


# ------------------------------------------------------------------------------------------- kernels
def _kernels():
    """The two Triton kernels, forward (also dQ, with its operands swapped) and dK/dV (their module is
    imported on first use, which reads TRITON_INTERPRET)."""
    from leanformer.ops import _fused_decay_kernels as kern

    return kern.fwd_kernel, kern.bwd_dkdv_kernel


def _block(T: int, dtype: torch.dtype, m: int, d: int, base: int | None = None) -> int:
    """A block of ``base`` (default BLOCK_M) tokens: at most 32 for float32 with m or d > 64, and the
    smallest power of two ≥ T (≥ 16, what tl.dot needs) for short sequences."""
    base = BLOCK_M if base is None else base
    if base < MIN_DIM or base & (base - 1):
        raise ValueError(f"block size {base} must be a power of two ≥ {MIN_DIM}")
    big = min(base, 32) if dtype == torch.float32 and max(m, d) > 64 else base
    if T >= big:  # first, so a symbolic T (a compiled prefill's length) of one block or more is not pinned to
        return big  # one value by bit_length (a shorter chunk still is: it recompiles for its length)
    return min(big, max(MIN_DIM, 1 << (T - 1).bit_length()))


SCALES = ("operand", "scores")


def _launch_args(q: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, log_norm: torch.Tensor | None):
    """n (a broadcast 0 when None), its strides, the query and key blocks and the kernels' constexpr
    arguments, from the module's switches as they are now.

    Under the interpreter the loops run over every block (T_END = T rounded up to the blocks), masked:
    Triton 3.6's interpreter cannot take a loop bound computed from the program id with numpy ≥ 2.4
    (triton-lang/triton#9171); compiled kernels loop only up to (from) the diagonal.
    """
    B, H, T, _ = q.shape
    n = log_norm if log_norm is not None else q.new_zeros((), dtype=torch.float32).expand(B, H, T)
    bm = _block(T, q.dtype, q.shape[-1], v.shape[-1], BLOCK_M)
    bn = _block(T, q.dtype, q.shape[-1], v.shape[-1], BLOCK_N)
    if FACTORED_SCALE not in SCALES:
        raise ValueError(f"FACTORED_SCALE={FACTORED_SCALE!r} must be one of {SCALES}")
    if FACTORED and CHECK_MONOTONE:
        _check_monotone(log_gamma, log_norm, T)
    interpret = _interpret()
    full_loops = interpret and INTERPRETER_FULL_LOOPS
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, HAS_NORM=log_norm is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit inputs
                INTERPRET=interpret, T_END=_cdiv(T, max(bm, bn)) * max(bm, bn) if full_loops else 0,
                FACTORED=bool(FACTORED), SCALE_OPERAND=FACTORED_SCALE == "operand", FULL_LOOPS=full_loops,
                REVERSE=bool(REVERSE_ROWS))
    return n, n.stride(), bm, bn, meta


KERNEL_NAMES = ("forward", "dK/dV", "dQ")


def _launch_options(kernel: int) -> dict:
    """num_warps (and num_stages unless None) for kernel 0 (forward), 1 (dK/dV) or 2 (dQ), from
    NUM_WARPS and NUM_STAGES (an int or None for all, or a tuple of three)."""
    opts = {}
    for name, value in (("num_warps", NUM_WARPS), ("num_stages", NUM_STAGES)):
        if isinstance(value, (tuple, list)):
            if len(value) != len(KERNEL_NAMES):
                raise ValueError(f"{name.upper()}={value!r}: one value, or one per kernel {KERNEL_NAMES}")
            value = value[kernel]
        if value is not None:
            opts[name] = int(value)
    return opts


def _check_monotone(log_gamma: torch.Tensor, log_norm: torch.Tensor | None, T: int) -> None:
    """FACTORED's precondition: a_i = n_i − i·logγ non-decreasing in i (up to float32 rounding of n), i.e.
    n a running maximum as DiJiang's (``running_log_norm``), or no n and logγ ≤ 0. Raises ValueError."""
    lg = log_gamma.double()
    if log_norm is None:
        if bool((lg > 0).any()):
            raise ValueError(f"FACTORED needs log_gamma ≤ 0 without log_norm; got {lg.max().item():.3g}")
        return
    a = log_norm.double() - torch.arange(T, device=lg.device, dtype=torch.float64) * lg[:, None]
    step = a.diff(dim=-1)
    tol = 1e-5 * (1 + float(a.abs().max())) if T > 1 else 0.0
    if T > 1 and float(step.min()) < -tol:
        raise ValueError(f"FACTORED needs n_i − i·logγ non-decreasing in i (n a running maximum, as DiJiang's "
                         f"running_log_norm); it falls by {-float(step.min()):.3g} (tolerance {tol:.3g}). "
                         "Set fused_decay_attention.FACTORED = False for this n")


# ----------------------------------------------------------------------------------------------- ops
# Registered at import (no Triton needed for that), so that torch.compile finds them already defined.
# With torch ≥ 2.6 they are ``triton_op``s, which compile traces into (the kernels appear in its graph).
# Under TRITON_INTERPRET=1 (read here, at import), with torch 2.5, or without Triton (a CPU-only install,
# where the kernels never run; torch's triton_op would log "Triton not available" at every import) they
# are opaque ``custom_op``s with fake implementations: compile cannot trace an interpreted kernel, but can
# call the op.
OP_ROUTE = ("triton_op" if hasattr(torch.library, "triton_op") and not _interpret()
            and importlib.util.find_spec("triton") is not None else "custom_op")


def _register(name: str, fake, mutates_args: tuple[str, ...] = ()):
    """Register ``fn`` as the op ``name`` (a ``triton_op``, or a ``custom_op`` with ``fake`` for its shapes) and
    return it wrapped in :class:`leanformer.ops.eager_op.EagerFastOp` (eager calls skip the dispatcher).
    ``mutates_args``: the arguments the op writes in place."""
    def dec(fn):
        if OP_ROUTE == "triton_op":
            op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        else:
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fake)
        return EagerFastOp(name, op, fn)
    return dec


def _wrap(kernel):
    """The kernel as a registered op's function launches it: through ``wrap_triton`` for a ``triton_op`` (so
    compile sees it), itself in a direct eager call (:func:`leanformer.ops.eager_op.direct_call_active`)."""
    return torch.library.wrap_triton(kernel) if OP_ROUTE == "triton_op" and not direct_call_active() else kernel


def _new_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                log_norm: torch.Tensor | None) -> torch.Tensor:
    """o: (B, H, T, d) in (B, T, H, d) memory, as v comes from the projections (merging heads is free)."""
    B, H, T, _ = q.shape
    return v.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)


def _new_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
               log_norm: torch.Tensor | None, grad_o: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_register("leanformer::decayed_attention", _new_output)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                log_norm: torch.Tensor | None) -> torch.Tensor:
    B, H, T, m = q.shape
    d = v.shape[-1]
    o = _new_output(q, k, v, log_gamma, log_norm)
    n, sn, bm, _, meta = _launch_args(q, v, log_gamma, log_norm)
    with _on_device(q):
        _wrap(_kernels()[0])[(B * H, _cdiv(T, bm))](
            q, k, v, log_gamma, n, o, *q.stride(), *k.stride(), *v.stride(), *sn, *o.stride(), H, T, M=m, D=d,
            **meta, **_launch_options(0))
    return o


@_register("leanformer::decayed_attention_bwd", _new_grads)
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                 log_norm: torch.Tensor | None, grad_o: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, m = q.shape
    d = v.shape[-1]
    dq, dk, dv = _new_grads(q, k, v, log_gamma, log_norm, grad_o)
    n, sn, bm, bn, meta = _launch_args(q, v, log_gamma, log_norm)
    forward_kernel, dkdv_kernel = _kernels()
    with _on_device(q):  # B·H on the grid's first axis: CUDA caps the second at 65,535
        _wrap(dkdv_kernel)[(B * H, _cdiv(T, bn))](
            q, k, v, log_gamma, n, grad_o, dk, dv, *q.stride(), *k.stride(), *v.stride(), *sn,
            *grad_o.stride(), *dk.stride(), *dv.stride(), H, T, M=m, D=d, **meta, **_launch_options(1))
        # dQ_i = Σ_{j≤i} Γ_ij (dO_i·v_j) k_j is the forward with (q, k, v) → (dO, v, k): the same kernel
        _wrap(forward_kernel)[(B * H, _cdiv(T, bm))](
            grad_o, v, k, log_gamma, n, dq, *grad_o.stride(), *v.stride(), *k.stride(), *sn, *dq.stride(),
            H, T, M=d, D=m, **meta, **_launch_options(2))
    return dq, dk, dv


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s (a model on cuda:1 while cuda:0 is
    current would otherwise fail, triton-lang/triton#2441)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _setup_context(ctx, inputs, output):
    q, k, v, log_gamma, log_norm = inputs
    ctx.save_for_backward(q, k, v, log_gamma, log_norm)


def _backward(ctx, grad_o):
    q, k, v, log_gamma, log_norm = ctx.saved_tensors
    dq, dk, dv = _backward_op(q, k, v, log_gamma, log_norm, grad_o)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def decayed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                      log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The masked part ``((q kᵀ) ⊙ Γ) v`` through the fused kernels, differentiable in q, k, v.

    q, k: (B, H, T, m); v: (B, H, T, d), one dtype (float32, bfloat16 or float16), any strides;
    log_gamma: (H,) (no gradient: detach it); log_norm: (B, H, T) or None (no gradient) →
    o: (B, H, T, d) in v's dtype, laid out as (B, T, H, d) memory. Raises ValueError with the reason when
    :func:`fused_supported` refuses the inputs, or when log_gamma / log_norm require grad.
    """
    reason = fused_supported(q, v)
    if reason is not None:
        raise ValueError(f"the fused decayed-attention kernel cannot run these inputs: {reason}; "
                         "use the 'parallel' form")
    if k.shape != q.shape or k.dtype != q.dtype or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k: (B, H, T, m) of one dtype and v: (B, H, T, d); got q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}")
    if log_gamma.requires_grad or (log_norm is not None and log_norm.requires_grad):
        raise ValueError("the fused kernel gives log_gamma and log_norm no gradient: pass them detached "
                         "(decayed_linear_attention.fused routes a learnable decay's gradient through q and k)")
    B, H, T, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape)
    lg = log_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    ln = log_norm.to(torch.float32) if log_norm is not None else None
    return _forward_op(q, k, v, lg, ln)
