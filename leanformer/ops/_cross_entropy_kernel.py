"""The Triton kernel of :mod:`leanformer.ops.linear_cross_entropy`: one row's cross-entropy and its logits' gradient.

Imported only by that module, on its first call (Triton needed only when the kernel runs); at module level
because Triton's interpreter runs a kernel's source again with its module's globals.

Each program takes rows z (V,) of the logits (one row each, or every programs-th row: the op's
``ROW_PROGRAMS_PER_SM``), in their dtype, with target y and the mean's 1/n (a device scalar, so nothing is read
back to the host):

    lse = log Σ_v exp(z_v)         (a first pass over z: a running maximum and sum per lane, in float32)
    loss term = lse − z_y          (0 where y is the ignored id)
    z̄_v = (exp(z_v − lse) − [v = y]) / n     (a second pass, written in z's dtype; 0 for an ignored row)

The second pass reads the row again (100 KB at GPT-2's vocabulary in bf16) right after the first and writes z̄ over
it, where PyTorch's log-softmax forward and backward kernels read the logits twice and write the gradient (module
docstring of the op). The second read was meant to come from L2; with one program per row it ran as if from HBM
(1.65 GB read twice and written once in 1.625 ms at b16, H100, 2026-12-07, docs/gpu/misc_2026-12-07/callZ).
"""

import triton
import triton.language as tl


@triton.jit
def cross_entropy_grad_kernel(L, T, INV_N, G, LOSS, N, V, sl, st, sg, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    """L (N, V) logits (row stride ``sl``, unit column stride), T (N,) int64 targets (stride ``st``), INV_N ()
    float32 → G (N, V) the gradient of the mean loss in L's dtype (row stride ``sg``), LOSS (N,) float32 the rows'
    loss terms. A negative target other than IGNORE counts as class 0 (as the PyTorch route of the op's module);
    one ≥ V is the caller's error (F.cross_entropy raises) and is read as V − 1, never outside the row.
    The grid's programs take rows pid, pid + programs, ... (one row each when the grid has N programs).
    G may be L (the op writes in place): each element of the second pass is loaded and stored by the same thread,
    and z[y] is taken in the first pass (a lane's copy, summed with the reductions), never read after it."""
    offs = tl.arange(0, BLOCK_V)
    for i in range(tl.program_id(0), N, tl.num_programs(0)):  # rows pid, pid + programs, ...
        row = tl.cast(i, tl.int64)
        y = tl.load(T + row * st)
        kept = y != IGNORE
        y = tl.minimum(tl.maximum(y, 0), V - 1)
        # a running maximum and sum per lane, one exp per element: the smaller of (m, z) relative to the larger. m
        # starts finite, so a lane that never sees a column (z = -inf) adds exp(-inf) = 0, not NaN. z[y] is kept by
        # the lane that reads it and summed with the reductions, not read again: in place, another warp may have
        # written z̄ over it by then (a scalar load after the reductions has no barrier before the second pass)
        m = tl.full((BLOCK_V,), -1e30, tl.float32)
        s = tl.zeros((BLOCK_V,), tl.float32)
        pk = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(L + row * sl + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            e = tl.exp(tl.minimum(m, z) - tl.maximum(m, z))
            s = tl.where(z > m, s * e + 1.0, s + e)
            m = tl.maximum(m, z)
            pk = tl.where(cols == y, z, pk)
        top = tl.max(m, axis=0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
        picked = tl.sum(pk, axis=0)
        tl.store(LOSS + row, tl.where(kept, lse - picked, 0.0))
        scale = tl.where(kept, tl.load(INV_N), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(L + row * sl + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - (cols == y).to(tl.float32)) * scale
            tl.store(G + row * sg + cols, g.to(G.dtype.element_ty), mask=cols < V)
