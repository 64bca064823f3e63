"""The Triton kernels of :mod:`leanformer.ops.noble_branch`: NOBLE's rank-r products with CosNet beside them.

Imported only by that module, on its first call. One program takes ``BLOCK_N`` rows and streams their full
width once, in ``BLOCK_K`` tiles, against a (BLOCK_K, R) tile of a rank-r weight (the weight is a few hundred KB:
it stays in L2 for every program), accumulating the (BLOCK_N, R) product in float32:

* :func:`down_cosnet_kernel`: ``z = x W_downᵀ + b_down``, stored rounded to Z's dtype, and ``s = σ(z)`` of the
  rounded z (what CosNet's own kernel computes from a stored z), stored in S's dtype;
* :func:`up_grad_cosnet_bwd_kernel`: ``ds = dy W_up``, then σ's backward from the stored z
  (:func:`leanformer.ops._cosnet_kernels._cosnet_backward`): dz and this program's partial parameter gradients.

Each replaces a rank-r product (one read of x or dy) and a CosNet kernel (a launch and a round trip of the
(N, R) tensor) by one launch that reads x or dy once. Rows past N load zeros and are not stored.
"""

import triton
import triton.language as tl

from leanformer.ops._cosnet_kernels import _cosnet, _cosnet_backward, _load_params
from leanformer.ops._fused_decay_kernels import mm


@triton.jit
def _rank_product(X, W, rows, row_ok, K, sxm, sxk, swk, swr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """X[rows, :K] · W[:K, :R] as (BLOCK_N, R) float32 (W addressed by its K stride ``swk`` and R stride ``swr``)."""
    cols = tl.arange(0, R)
    kk = tl.arange(0, BLOCK_K)
    x_ptr = X + rows[:, None] * sxm + kk[None, :] * sxk
    w_ptr = W + kk[:, None] * swk + cols[None, :] * swr
    acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptr, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptr)
        else:
            k_ok = kk < K - k0 * BLOCK_K
            x = tl.load(x_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr, mask=k_ok[:, None], other=0.0)
        acc += mm(x, w, PRECISION, INTERPRET)
        x_ptr += BLOCK_K * sxk
        w_ptr += BLOCK_K * swk
    return acc


@triton.jit
def down_cosnet_kernel(X, WD, BD, W1, P1, M, C, W2, P2, Z, S, N, K, sxm, sxk, swr, swk, szm, ssm,
                       R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """z = x W_downᵀ + b_down and s = σ(z) for BLOCK_N rows of x (N, K); W_down (R, K)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, R)
    row_ok = rows < N
    z = _rank_product(X, WD, rows, row_ok, K, sxm, sxk, swk, swr, R, BLOCK_N, BLOCK_K, EVEN_K, PRECISION,
                      INTERPRET)
    z = (z + tl.load(BD + cols).to(tl.float32)[None, :]).to(Z.dtype.element_ty)
    mask = row_ok[:, None]
    tl.store(Z + rows[:, None] * szm + cols[None, :], z, mask=mask)
    w1, p1, m, c, w2, p2 = _load_params(W1, P1, M, C, W2, P2, R)
    s = _cosnet(z.to(tl.float32), w1, p1, m, c, w2, p2, "ieee")
    tl.store(S + rows[:, None] * ssm + cols[None, :], s.to(S.dtype.element_ty), mask=mask)


@triton.jit
def up_grad_cosnet_bwd_kernel(DY, WU, Z, W1, P1, M, C, W2, P2, DZ, PART, N, K, sdm, sdk, swk, swr, szm, sdzm,
                              R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """ds = dy W_up for BLOCK_N rows of dy (N, K = d_out), W_up (K, R); then dz and PART[pid] (σ's backward)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, R)
    row_ok = rows < N
    ds = _rank_product(DY, WU, rows, row_ok, K, sdm, sdk, swk, swr, R, BLOCK_N, BLOCK_K, EVEN_K, PRECISION,
                      INTERPRET)
    mask = row_ok[:, None]
    z = tl.load(Z + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _cosnet_backward(z, ds, W1, P1, M, C, W2, P2, DZ, PART, rows, cols, mask, sdzm, R)
