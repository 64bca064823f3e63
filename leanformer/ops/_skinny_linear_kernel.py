"""The Triton kernel of :mod:`leanformer.ops.skinny_linear`: ``y = x Wᵀ (+ b)`` for a few rows of x.

Imported only by that module, on its first call (Triton needed only when the kernel runs). It sits at module
level because Triton's interpreter runs a kernel's source again with its module's globals.

One program per ``BLOCK_N`` output columns: it streams its (BLOCK_N, K) slice of W once, in (BLOCK_N,
BLOCK_K) tiles, against the (BLOCK_M, BLOCK_K) tiles of x (rows ≥ M masked to zero), and accumulates
``tl.dot`` products in float32 (``mm``: float32 operands under the interpreter, whose bf16 product is
wrong); the bias is added in float32 and y rounded once to its dtype (then, with ``ACT``, the activation
of the rounded y, rounded again: what ``F.linear`` followed by the eager activation gives). A narrow BLOCK_N
gives many programs, so a product whose weight is a few MB is read by most of the GPU's SMs at once (the op
module's docstring). ``PDL`` (a programmatic dependent launch, Hopper): the program lets the next kernel
launch at once and waits (``gdc_wait``) for the kernel before it before reading anything, so its launch
overlaps that kernel's tail.
"""

import triton
import triton.language as tl

from leanformer.ops._fused_decay_kernels import mm
from leanformer.ops._fused_decay_step_kernel import _round


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """float32 x → ACT 1: GELU (erf), 2: GELU (tanh approximation), 3: ReLU, as PyTorch computes them."""
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    if ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh(u) = 2σ(2u) − 1
    return tl.maximum(x, 0.0)


@triton.jit
def _load_w(W, offs_n, n_ok, kk, K, swn, swk, EVEN_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) tile of W at columns ``kk`` (zero past N and K)."""
    if EVEN_K:
        return tl.load(W + offs_n[:, None] * swn + kk[None, :] * swk, mask=n_ok[:, None], other=0.0)
    return tl.load(W + offs_n[:, None] * swn + kk[None, :] * swk, mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _load_x(X, offs_m, m_ok, kk, K, sxm, sxk, EVEN_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) tile of x at columns ``kk`` (zero past M and K)."""
    if EVEN_K:
        return tl.load(X + offs_m[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None], other=0.0)
    return tl.load(X + offs_m[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _product_tile(X, W, Bias, offs_m, m_ok, offs_n, n_ok, K, sxm, sxk, swn, swk, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """x Wᵀ (+ b) for rows ``offs_m`` and columns ``offs_n``: (BLOCK_M, BLOCK_N) float32, not rounded (W's slice
    streamed once in (BLOCK_N, BLOCK_K) tiles; the kernels of a plain few-row product's shape share it)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = _load_x(X, offs_m, m_ok, kk, K, sxm, sxk, EVEN_K)
        acc += mm(x, tl.trans(_load_w(W, offs_n, n_ok, kk, K, swn, swk, EVEN_K)), "ieee", INTERPRET)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def skinny_linear_kernel(X, LNW, LNB, W, Bias, RES, Y, M, N, K, eps, sxm, sxk, swn, swk, srm, srn, sym, syn,
                         LN: tl.constexpr, LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, INTERPRET: tl.constexpr, ACT: tl.constexpr = 0,
                         PDL: tl.constexpr = False, FMA: tl.constexpr = False):
    """y = residual + act(LayerNorm(x) Wᵀ + b), each part optional. ``LN``: LayerNorm of x's rows in the
    prologue (mean and variance over K in float32, two passes over x, then each tile normalised, scaled,
    shifted and rounded to x's dtype as ``F.layer_norm`` rounds its output; every program recomputes the
    statistics: x is a few rows, 8 × 768 bf16 = 12 KB, from L2). ``HAS_RES``: the rounded product (and
    activation) plus RES, rounded again, as ``residual + F.linear(...)``. ``FMA``: the product as float32
    multiply-adds over a (BLOCK_M, BLOCK_N, BLOCK_K) block instead of ``tl.dot``, which needs 16 rows and 16
    columns: BLOCK_M and BLOCK_N may then be 1 to 8 (more programs for a narrow output)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if PDL:  # a programmatic dependent launch: the next such kernel may launch now, and every read waits for
        tl.extra.cuda.gdc_launch_dependents()  # the kernel before this one (it may have written x, or W itself:
        tl.extra.cuda.gdc_wait()  # a re-fused input weight), so only the launch overlaps that kernel's tail
    dt = Y.dtype.element_ty
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if LN:
        for k0 in range(0, K, BLOCK_K):
            mean += tl.sum(_load_x(X, offs_m, m_ok, k0 + offs_k, K, sxm, sxk, False).to(tl.float32), axis=1)
        mean = mean / K
        var = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            xc = _load_x(X, offs_m, m_ok, kk, K, sxm, sxk, False).to(tl.float32) - mean[:, None]
            xc = tl.where((kk < K)[None, :], xc, 0.0)
            var += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt((var / K + eps).to(tl.float32))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = _load_x(X, offs_m, m_ok, kk, K, sxm, sxk, EVEN_K)
        if LN:
            k_ok = kk < K
            g = tl.load(LNW + kk, mask=k_ok, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :]
            if LN_BIAS:
                xn += tl.load(LNB + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            x = _round(xn, dt).to(dt)  # past K: g = 0 (and the shift 0), so 0
        w = _load_w(W, offs_n, n_ok, kk, K, swn, swk, EVEN_K)
        if FMA:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        else:
            acc += mm(x, tl.trans(w), "ieee", INTERPRET)  # float32 x: no TF32, as F.linear
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _round(acc, dt)  # rounded by hand to nearest (the interpreter's cast truncates), then cast exactly
    if ACT != 0:  # on the rounded product, then rounded again: as F.linear then the eager activation
        acc = _round(_activation(acc, ACT), dt)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        res = tl.load(RES + offs_m[:, None] * srm + offs_n[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
        acc = _round(acc + res, dt)
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(dt), mask=mask)


@triton.jit
def skinny_partials_kernel(X, W, P, M, N, K, K_SPLIT, sxm, sxk, swn, swk, sps, spm, spn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    """Split-K partial products: program (n, s) writes ``P[s] = x[:, K_s] W[n-block, K_s]ᵀ`` in float32, where
    K_s = [s·K_SPLIT, min(K, (s+1)·K_SPLIT)). The caller sums P over s (and adds the bias, rounds once): a
    product with a long K and a narrow output (GPT-2's MLP down, 3072 → 768: 48 column blocks, 12 K tiles each)
    then runs on S times more programs, each streaming S times fewer bytes. ``EVEN_K``: K is a multiple of
    BLOCK_K (K_SPLIT always is), so no part needs masks along K."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_s * K_SPLIT
    k_len = tl.minimum(K - k_lo, K_SPLIT)
    acc = _product_tile(X + k_lo * sxk, W + k_lo * swk, W, offs_m, m_ok, offs_n, n_ok, k_len, sxm, sxk, swn, swk,
                        False, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INTERPRET)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(P + pid_s * sps + offs_m[:, None] * spm + offs_n[None, :] * spn, acc, mask=mask)
