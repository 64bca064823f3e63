"""The Triton kernels of :mod:`leanformer.ops.shaped_mix`: shaped attention's causal mix, forward and backward.

Imported only by that module, on its first launch (so Triton is needed only when they run, and
``TRITON_INTERPRET`` is read then). One program takes one (batch row, head) and ``BLOCK_D`` value columns, and
scans time in tiles of ``BLOCK_T`` positions, in float32, carrying the running sum from tile to tile:

    forward   c_t = (1/(t+1)) Σ_{j≤t} v_j,   out_t = α v_t + β s_t − γ c_t          (SAS, Eq. 5; s = SDPA's output)
    backward  R_t = Σ_{i≥t} dout_i / (i+1)   (a reverse scan)
              dv_t = α dout_t − γ R_t,   ds_t = β dout_t,
              dα = Σ dout·v,   dβ = Σ dout·s,   dγ = −Σ_t dout_t·c_t = −Σ_t v_t·R_t

so the backward needs neither c nor anything else saved beyond v and s (which SDPA's own backward keeps).
Each program writes its partial sums of dα, dβ, dγ; the caller adds them over batch rows and column blocks.
Rows past T load 0 and add nothing.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(P, base, t, cols, stride_t, mask):
    return tl.load(P + base + t[:, None].to(tl.int64) * stride_t + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def shaped_mix_fwd_kernel(V, S, ALPHA, BETA, GAMMA, OUT, T, H, D,
                          sv_b, sv_h, sv_t, ss_b, ss_h, ss_t, so_b, so_h, so_t,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (B, H, T, D) = α v + β s − γ · causal running mean of v, for one (b, h) and BLOCK_D columns."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    alpha, beta = tl.load(ALPHA + h).to(tl.float32), tl.load(BETA + h).to(tl.float32)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    vb, sb = b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h, b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h
    ob = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    carry = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & (cols < D)[None, :]
        v = _tile(V, vb, t, cols, sv_t, mask)
        s = _tile(S, sb, t, cols, ss_t, mask)
        mean = (carry[None, :] + tl.cumsum(v, axis=0)) / (t + 1).to(tl.float32)[:, None]
        out = alpha * v + beta * s - gamma * mean
        tl.store(OUT + ob + t[:, None].to(tl.int64) * so_t + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        carry += tl.sum(v, axis=0)


@triton.jit
def shaped_mix_bwd_kernel(V, S, DOUT, ALPHA, BETA, GAMMA, DV, DS, PART, T, H, D,
                          sv_b, sv_h, sv_t, ss_b, ss_h, ss_t, sg_b, sg_h, sg_t, sdv_b, sdv_h, sdv_t,
                          sds_b, sds_h, sds_t,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dv (the mix's part of it), ds and this program's partial (dα, dβ, dγ) at PART[b, h, column block]."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    alpha, beta = tl.load(ALPHA + h).to(tl.float32), tl.load(BETA + h).to(tl.float32)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    vb, sb, gb = b64 * sv_b + h64 * sv_h, b64 * ss_b + h64 * ss_h, b64 * sg_b + h64 * sg_h
    dvb, dsb = b64 * sdv_b + h64 * sdv_h, b64 * sds_b + h64 * sds_h
    carry = tl.zeros((BLOCK_D,), dtype=tl.float32)  # Σ dout_i / (i+1) over the tiles after this one
    d_alpha = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_beta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_gamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_tiles):
        t = (n_tiles - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (t < T)[:, None] & (cols < D)[None, :]
        g = _tile(DOUT, gb, t, cols, sg_t, mask)
        v = _tile(V, vb, t, cols, sv_t, mask)
        s = _tile(S, sb, t, cols, ss_t, mask)
        w = g / (t + 1).to(tl.float32)[:, None]
        r = carry[None, :] + tl.cumsum(w, axis=0, reverse=True)
        t64 = t[:, None].to(tl.int64)
        tl.store(DV + dvb + t64 * sdv_t + cols[None, :], (alpha * g - gamma * r).to(DV.dtype.element_ty), mask=mask)
        tl.store(DS + dsb + t64 * sds_t + cols[None, :], (beta * g).to(DS.dtype.element_ty), mask=mask)
        d_alpha += tl.sum(g * v, axis=0)
        d_beta += tl.sum(g * s, axis=0)
        d_gamma -= tl.sum(v * r, axis=0)
        carry += tl.sum(w, axis=0)
    out = PART + (bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * 3
    tl.store(out, tl.sum(d_alpha, axis=0))
    tl.store(out + 1, tl.sum(d_beta, axis=0))
    tl.store(out + 2, tl.sum(d_gamma, axis=0))
