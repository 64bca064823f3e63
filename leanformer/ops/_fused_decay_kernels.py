"""The Triton kernels of :mod:`leanformer.ops.fused_decay_attention` (forward, dK/dV, dQ).

Imported only by that module, on its first call, so that Triton is needed only when the kernels run and
``TRITON_INTERPRET`` is read then. They sit at module level because Triton's interpreter runs a kernel's
source again with its module's globals (a kernel nested in a function cannot see its helpers there).
Shapes, strides and the masking are described in :mod:`leanformer.ops.fused_decay_attention`.
"""

import triton
import triton.language as tl


@triton.jit
def decay_tile(offs_i, offs_j, lg, n_i, n_j, T, HAS_NORM: tl.constexpr, KEYS_BY_QUERIES: tl.constexpr):
    """Γ tile exp((i−j)·lg + n_j − n_i), 0 where j > i or i ≥ T (the exponent is −inf there before exp):
    (len(offs_i), len(offs_j)), or its transpose (len(offs_j), len(offs_i)) with KEYS_BY_QUERIES."""
    if KEYS_BY_QUERIES:
        ii = offs_i[None, :]
        jj = offs_j[:, None]
    else:
        ii = offs_i[:, None]
        jj = offs_j[None, :]
    e = (ii - jj).to(tl.float32) * lg
    if HAS_NORM:
        if KEYS_BY_QUERIES:
            e = e + n_j[:, None] - n_i[None, :]
        else:
            e = e + n_j[None, :] - n_i[:, None]
    return tl.exp(tl.where((jj <= ii) & (ii < T), e, float("-inf")))


@triton.jit
def mm(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot(a, b) with float32 accumulation. Triton 3.6's interpreter multiplies bfloat16 wrongly (it
    reads the raw bits); there the operands are widened to float32 first (exact: bf16 ⊂ fp32)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def fwd_kernel(Q, K, V, LG, N, O,
               sqb, sqh, sqt, sqm, skb, skh, skt, skm, svb, svh, svt, svd, snb, snh, snt, sob, soh, sot, sod,
               H, T, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_NORM: tl.constexpr, PRECISION: tl.constexpr,
               INTERPRET: tl.constexpr, T_END: tl.constexpr):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)  # int64: b·stride passes 2^31 for large B·T·H·m
    b = bh // H
    h = bh % H
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < T
    q = tl.load(Q + b * sqb + h * sqh + offs_i[:, None] * sqt + offs_m[None, :] * sqm,
                mask=mask_i[:, None], other=0.0)
    lg = tl.load(LG + h)
    n_i = tl.load(N + b * snb + h * snh + offs_i * snt, mask=mask_i, other=0.0) if HAS_NORM else lg
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    # key blocks up to the diagonal (interpreter: every block, masked; see _launch_args)
    for start_n in range(0, T_END if INTERPRET else (pid_m + 1) * BLOCK_M, BLOCK_N):
        offs_j = start_n + tl.arange(0, BLOCK_N)
        mask_j = offs_j < T
        k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_m[None, :] * skm,
                    mask=mask_j[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                    mask=mask_j[:, None], other=0.0)
        n_j = tl.load(N + b * snb + h * snh + offs_j * snt, mask=mask_j, other=0.0) if HAS_NORM else lg
        s = mm(q, tl.trans(k), PRECISION, INTERPRET)
        p = s * decay_tile(offs_i, offs_j, lg, n_i, n_j, T, HAS_NORM, False)
        acc += mm(p.to(v.dtype), v, PRECISION, INTERPRET)
    tl.store(O + b * sob + h * soh + offs_i[:, None] * sot + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=mask_i[:, None])


@triton.jit
def bwd_dkdv_kernel(Q, K, V, LG, N, DO, DK, DV,
                    sqb, sqh, sqt, sqm, skb, skh, skt, skm, svb, svh, svt, svd, snb, snh, snt,
                    sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkt, sdkm, sdvb, sdvh, sdvt, sdvd,
                    H, T, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_NORM: tl.constexpr, PRECISION: tl.constexpr,
                    INTERPRET: tl.constexpr, T_END: tl.constexpr):
    pid_n = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)  # int64: b·stride passes 2^31 for large B·T·H·m
    b = bh // H
    h = bh % H
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    mask_j = offs_j < T
    k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_m[None, :] * skm,
                mask=mask_j[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                mask=mask_j[:, None], other=0.0)
    lg = tl.load(LG + h)
    n_j = tl.load(N + b * snb + h * snh + offs_j * snt, mask=mask_j, other=0.0) if HAS_NORM else lg
    dk = tl.zeros((BLOCK_N, M), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    # query blocks from the diagonal on (interpreter: every block, masked; see _launch_args)
    for start_m in range(0 if INTERPRET else (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M,
                         T_END if INTERPRET else T, BLOCK_M):
        offs_i = start_m + tl.arange(0, BLOCK_M)
        mask_i = offs_i < T
        q = tl.load(Q + b * sqb + h * sqh + offs_i[:, None] * sqt + offs_m[None, :] * sqm,
                    mask=mask_i[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_i[:, None] * sdot + offs_d[None, :] * sdod,
                     mask=mask_i[:, None], other=0.0)
        n_i = tl.load(N + b * snb + h * snh + offs_i * snt, mask=mask_i, other=0.0) if HAS_NORM else lg
        g = decay_tile(offs_i, offs_j, lg, n_i, n_j, T, HAS_NORM, True)  # Γᵀ: (BLOCK_N, BLOCK_M)
        pT = mm(k, tl.trans(q), PRECISION, INTERPRET) * g
        dv += mm(pT.to(do.dtype), do, PRECISION, INTERPRET)
        dsT = mm(v, tl.trans(do), PRECISION, INTERPRET) * g
        dk += mm(dsT.to(q.dtype), q, PRECISION, INTERPRET)
    tl.store(DK + b * sdkb + h * sdkh + offs_j[:, None] * sdkt + offs_m[None, :] * sdkm,
             dk.to(DK.dtype.element_ty), mask=mask_j[:, None])
    tl.store(DV + b * sdvb + h * sdvh + offs_j[:, None] * sdvt + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask_j[:, None])


@triton.jit
def bwd_dq_kernel(K, V, LG, N, DO, DQ,
                  skb, skh, skt, skm, svb, svh, svt, svd, snb, snh, snt,
                  sdob, sdoh, sdot, sdod, sdqb, sdqh, sdqt, sdqm,
                  H, T, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_NORM: tl.constexpr, PRECISION: tl.constexpr,
                  INTERPRET: tl.constexpr, T_END: tl.constexpr):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)  # int64: b·stride passes 2^31 for large B·T·H·m
    b = bh // H
    h = bh % H
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    mask_i = offs_i < T
    do = tl.load(DO + b * sdob + h * sdoh + offs_i[:, None] * sdot + offs_d[None, :] * sdod,
                 mask=mask_i[:, None], other=0.0)
    lg = tl.load(LG + h)
    n_i = tl.load(N + b * snb + h * snh + offs_i * snt, mask=mask_i, other=0.0) if HAS_NORM else lg
    dq = tl.zeros((BLOCK_M, M), dtype=tl.float32)
    # key blocks up to the diagonal (interpreter: every block, masked; see _launch_args)
    for start_n in range(0, T_END if INTERPRET else (pid_m + 1) * BLOCK_M, BLOCK_N):
        offs_j = start_n + tl.arange(0, BLOCK_N)
        mask_j = offs_j < T
        k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_m[None, :] * skm,
                    mask=mask_j[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                    mask=mask_j[:, None], other=0.0)
        n_j = tl.load(N + b * snb + h * snh + offs_j * snt, mask=mask_j, other=0.0) if HAS_NORM else lg
        ds = mm(do, tl.trans(v), PRECISION, INTERPRET) * decay_tile(offs_i, offs_j, lg, n_i, n_j, T,
                                                                           HAS_NORM, False)
        dq += mm(ds.to(k.dtype), k, PRECISION, INTERPRET)
    tl.store(DQ + b * sdqb + h * sdqh + offs_i[:, None] * sdqt + offs_m[None, :] * sdqm,
             dq.to(DQ.dtype.element_ty), mask=mask_i[:, None])
