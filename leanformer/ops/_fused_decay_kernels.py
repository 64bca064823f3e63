"""The Triton kernels of :mod:`leanformer.ops.fused_decay_attention`: forward and dK/dV. dQ is the forward
kernel with its operands swapped: dQ_i = Σ_{j≤i} Γ_ij (dO_i·v_j) k_j is o_i with (q, k, v) → (dO, v, k).

Imported only by that module, on its first call, so that Triton is needed only when the kernels run and
``TRITON_INTERPRET`` is read then. They sit at module level because Triton's interpreter runs a kernel's
source again with its module's globals (a kernel nested in a function cannot see its helpers there).
Shapes, strides, the masking and the factored variant (``FACTORED``) are described in
:mod:`leanformer.ops.fused_decay_attention`.

Constexpr switches shared by the kernels: ``FACTORED`` (off-diagonal tiles through a pivot, see
below), ``SCALE_OPERAND`` (factored: scale an operand's rows, cast back to the input dtype, vs. scale the
score tile's columns in float32), ``FULL_LOOPS`` (loop over every block, masked, instead of loop bounds
computed from the program id: the interpreter's, triton-lang/triton#9171), ``REVERSE`` (forward and dQ:
the longest query rows first), ``INTERPRET`` (float32 operands for the interpreter's ``tl.dot``).

Factored variant, with a_x = n_x − x·logγ (non-decreasing: the caller's precondition): for a query block
starting at i0, every key tile wholly below i0 is *off-diagonal* and Γ_ij = exp(a_j − a_i0)·exp(a_i0 − a_i),
both factors ≤ 1; the key factor scales the tile's keys (BLOCK_N exps per tile), the query factor the
off-diagonal accumulator's rows once at the end. The dK/dV kernel pivots on its key block's last key j1
and scales the queries of the tiles wholly after j1. Exponents are formed from integer position
differences and n differences (as in :func:`decay_tile`), never from a_x itself, so long sequences lose
no precision to a large |x·logγ|.
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
def pivot_factor(offs, pivot, lg, n, n_p, mask, HAS_NORM: tl.constexpr, BEFORE_PIVOT: tl.constexpr):
    """Factored variant: exp(a_x − a_p) for positions x = offs before the pivot p (BEFORE_PIVOT), else
    exp(a_p − a_x) (x after p), with a_x = n_x − x·lg; 0 where ~mask. Both ≤ 1 when a is non-decreasing.
    offs, n, mask: (len,); pivot, n_p: scalars → (len,) float32."""
    if BEFORE_PIVOT:
        e = (pivot - offs).to(tl.float32) * lg
        if HAS_NORM:
            e = e + (n - n_p)
    else:
        e = (offs - pivot).to(tl.float32) * lg
        if HAS_NORM:
            e = e + (n_p - n)
    return tl.exp(tl.where(mask, e, float("-inf")))


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
               INTERPRET: tl.constexpr, T_END: tl.constexpr, FACTORED: tl.constexpr = False,
               SCALE_OPERAND: tl.constexpr = True, FULL_LOOPS: tl.constexpr = False,
               REVERSE: tl.constexpr = False):
    if REVERSE:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
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
    hi = (pid_m + 1) * BLOCK_M
    if BLOCK_N < BLOCK_M:
        hi = tl.minimum(hi, T)  # no key tile wholly past the sequence
    if FACTORED:
        # off-diagonal key tiles [0, lo): every key < i0 (the pivot) ≤ every query of the block
        i0 = pid_m * BLOCK_M
        lo = (i0 // BLOCK_N) * BLOCK_N
        n_p = tl.load(N + b * snb + h * snh + i0 * snt) if HAS_NORM else lg
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        for start_n in range(0, T_END if FULL_LOOPS else lo, BLOCK_N):
            offs_j = start_n + tl.arange(0, BLOCK_N)
            mask_j = offs_j < T
            if FULL_LOOPS:
                mask_j = mask_j & (offs_j < lo)  # = start_n < lo (lo is a multiple of BLOCK_N); a tensor
                # comparison: Triton 3.9's interpreter gives a scalar one an int32 mask
            k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_m[None, :] * skm,
                        mask=mask_j[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                        mask=mask_j[:, None], other=0.0)
            n_j = tl.load(N + b * snb + h * snh + offs_j * snt, mask=mask_j, other=0.0) if HAS_NORM else lg
            w = pivot_factor(offs_j, i0, lg, n_j, n_p, mask_j, HAS_NORM, True)  # exp(a_j − a_i0) ≤ 1
            if SCALE_OPERAND:
                s = mm(q, tl.trans((k * w[:, None]).to(k.dtype)), PRECISION, INTERPRET)
            else:
                s = mm(q, tl.trans(k), PRECISION, INTERPRET) * w[None, :]
            acc += mm(s.to(v.dtype), v, PRECISION, INTERPRET)
        acc = acc * pivot_factor(offs_i, i0, lg, n_i, n_p, mask_i, HAS_NORM, False)[:, None]  # exp(a_i0 − a_i)
    else:
        lo = 0
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    # key blocks up to the diagonal (interpreter: every block, masked; see _launch_args)
    for start_n in range(0 if FULL_LOOPS else lo, T_END if FULL_LOOPS else hi, BLOCK_N):
        offs_j = start_n + tl.arange(0, BLOCK_N)
        mask_j = offs_j < T
        k = tl.load(K + b * skb + h * skh + offs_j[:, None] * skt + offs_m[None, :] * skm,
                    mask=mask_j[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_j[:, None] * svt + offs_d[None, :] * svd,
                    mask=mask_j[:, None], other=0.0)
        n_j = tl.load(N + b * snb + h * snh + offs_j * snt, mask=mask_j, other=0.0) if HAS_NORM else lg
        s = mm(q, tl.trans(k), PRECISION, INTERPRET)
        g = decay_tile(offs_i, offs_j, lg, n_i, n_j, T, HAS_NORM, False)
        if FACTORED:
            if FULL_LOOPS:  # the compiled loop's bounds, as masks
                tile = offs_j - tl.arange(0, BLOCK_N)  # start_n, as a tensor (see above)
                g = tl.where(((tile >= lo) & (tile < hi))[None, :], g, 0.0)
        p = s * g
        acc += mm(p.to(v.dtype), v, PRECISION, INTERPRET)
    tl.store(O + b * sob + h * soh + offs_i[:, None] * sot + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=mask_i[:, None])


@triton.jit
def bwd_dkdv_kernel(Q, K, V, LG, N, DO, DK, DV,
                    sqb, sqh, sqt, sqm, skb, skh, skt, skm, svb, svh, svt, svd, snb, snh, snt,
                    sdob, sdoh, sdot, sdod, sdkb, sdkh, sdkt, sdkm, sdvb, sdvh, sdvt, sdvd,
                    H, T, M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_NORM: tl.constexpr, PRECISION: tl.constexpr,
                    INTERPRET: tl.constexpr, T_END: tl.constexpr, FACTORED: tl.constexpr = False,
                    SCALE_OPERAND: tl.constexpr = True, FULL_LOOPS: tl.constexpr = False,
                    REVERSE: tl.constexpr = False):
    pid_n = tl.program_id(1)  # REVERSE is not used: key block 0 already has the longest loop
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
    if FACTORED:
        # off-diagonal query tiles [hi, T): every query > j1 (the pivot, the block's last key) ≥ every key;
        # a last, partial block pivots on key T − 1 (it has no off-diagonal tile, but u below must be finite)
        j1 = tl.minimum(pid_n * BLOCK_N + BLOCK_N, T) - 1
        hi = tl.cdiv(j1 + 1, BLOCK_M) * BLOCK_M
        n_p = tl.load(N + b * snb + h * snh + j1 * snt) if HAS_NORM else lg
        dk = tl.zeros((BLOCK_N, M), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
        for start_m in range(0 if FULL_LOOPS else hi, T_END if FULL_LOOPS else T, BLOCK_M):
            offs_i = start_m + tl.arange(0, BLOCK_M)
            mask_i = offs_i < T
            if FULL_LOOPS:
                mask_i = mask_i & (offs_i - tl.arange(0, BLOCK_M) >= hi)  # start_m ≥ hi, as a tensor
            q = tl.load(Q + b * sqb + h * sqh + offs_i[:, None] * sqt + offs_m[None, :] * sqm,
                        mask=mask_i[:, None], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_i[:, None] * sdot + offs_d[None, :] * sdod,
                         mask=mask_i[:, None], other=0.0)
            n_i = tl.load(N + b * snb + h * snh + offs_i * snt, mask=mask_i, other=0.0) if HAS_NORM else lg
            w = pivot_factor(offs_i, j1, lg, n_i, n_p, mask_i, HAS_NORM, False)  # exp(a_j1 − a_i) ≤ 1
            if SCALE_OPERAND:  # q alone carries w: dV = (K (wQ)ᵀ) dO, dK = (V dOᵀ) (wQ)
                qs = (q * w[:, None]).to(q.dtype)
                pT = mm(k, tl.trans(qs), PRECISION, INTERPRET)
                dv += mm(pT.to(do.dtype), do, PRECISION, INTERPRET)
                dsT = mm(v, tl.trans(do), PRECISION, INTERPRET)
                dk += mm(dsT.to(q.dtype), qs, PRECISION, INTERPRET)
            else:
                pT = mm(k, tl.trans(q), PRECISION, INTERPRET) * w[None, :]
                dv += mm(pT.to(do.dtype), do, PRECISION, INTERPRET)
                dsT = mm(v, tl.trans(do), PRECISION, INTERPRET) * w[None, :]
                dk += mm(dsT.to(q.dtype), q, PRECISION, INTERPRET)
        u = pivot_factor(offs_j, j1, lg, n_j, n_p, mask_j, HAS_NORM, True)[:, None]  # exp(a_j − a_j1) ≤ 1
        dk = dk * u
        dv = dv * u
        hi = tl.minimum(hi, T)
    else:
        hi = T
        dk = tl.zeros((BLOCK_N, M), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    # query blocks from the diagonal on (interpreter: every block, masked; see _launch_args)
    for start_m in range(0 if FULL_LOOPS else (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M,
                         T_END if FULL_LOOPS else hi, BLOCK_M):
        offs_i = start_m + tl.arange(0, BLOCK_M)
        mask_i = offs_i < T
        q = tl.load(Q + b * sqb + h * sqh + offs_i[:, None] * sqt + offs_m[None, :] * sqm,
                    mask=mask_i[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_i[:, None] * sdot + offs_d[None, :] * sdod,
                     mask=mask_i[:, None], other=0.0)
        n_i = tl.load(N + b * snb + h * snh + offs_i * snt, mask=mask_i, other=0.0) if HAS_NORM else lg
        g = decay_tile(offs_i, offs_j, lg, n_i, n_j, T, HAS_NORM, True)  # Γᵀ: (BLOCK_N, BLOCK_M)
        if FACTORED:
            if FULL_LOOPS:  # the compiled loop's bounds, as masks
                tile = offs_i - tl.arange(0, BLOCK_M)  # start_m, as a tensor
                g = tl.where(((tile >= (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M) & (tile < hi))[None, :], g, 0.0)
        pT = mm(k, tl.trans(q), PRECISION, INTERPRET) * g
        dv += mm(pT.to(do.dtype), do, PRECISION, INTERPRET)
        dsT = mm(v, tl.trans(do), PRECISION, INTERPRET) * g
        dk += mm(dsT.to(q.dtype), q, PRECISION, INTERPRET)
    tl.store(DK + b * sdkb + h * sdkh + offs_j[:, None] * sdkt + offs_m[None, :] * sdkm,
             dk.to(DK.dtype.element_ty), mask=mask_j[:, None])
    tl.store(DV + b * sdvb + h * sdvh + offs_j[:, None] * sdvt + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask_j[:, None])
