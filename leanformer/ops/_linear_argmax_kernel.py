"""The Triton kernel of :mod:`leanformer.ops.linear_argmax`: a few rows' logits and each column block's argmax.

One program per ``BLOCK_N`` output columns, as :mod:`leanformer.ops._skinny_linear_kernel` (the same tiles,
loop and roundings, so the logits are that kernel's bits): it streams its (BLOCK_N, K) slice of W against x's
tiles, adds the bias in float32, rounds to Y's dtype and stores the logits. Its epilogue then reduces its own
columns: for each row, the largest rounded logit and the first column holding it, stored at
``PMAX[m, pid]`` (float32) and ``PIDX[m, pid]`` (int32). A NaN is ranked above every number and +inf
between the finite values and NaN (key: NaN → +inf, +inf → float32's largest finite value, which no 16-bit
logit reaches), so the first-maximum over the blocks' keys is ``torch.argmax``'s index over the logits.
"""

import triton
import triton.language as tl

from leanformer.ops._fused_decay_step_kernel import _round
from leanformer.ops._skinny_linear_kernel import _product_tile


@triton.jit
def linear_argmax_kernel(X, W, Bias, Y, PMAX, PIDX, M, N, K, sxm, sxk, swn, swk, sym, syn, spm,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dt = Y.dtype.element_ty
    acc = _product_tile(X, W, Bias, offs_m, m_ok, offs_n, n_ok, K, sxm, sxk, swn, swk, HAS_BIAS, BLOCK_M, BLOCK_N,
                        BLOCK_K, EVEN_K, INTERPRET)
    y = _round(acc, dt)
    tl.store(Y + offs_m[:, None] * sym + offs_n[None, :] * syn, y.to(dt), mask=m_ok[:, None] & n_ok[None, :])
    key = tl.where(y != y, float("inf"), tl.where(y == float("inf"), 3.4028234663852886e38, y))
    key = tl.where(n_ok[None, :], key, float("-inf"))  # past N: never first (a row of -inf picks its first column)
    best = tl.max(key, axis=1)
    first = tl.min(tl.where(key == best[:, None], offs_n[None, :], N + BLOCK_N), axis=1)  # first column at best
    tl.store(PMAX + offs_m * spm + pid, best, mask=m_ok)
    tl.store(PIDX + offs_m * spm + pid, first.to(tl.int32), mask=m_ok)
