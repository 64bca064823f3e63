"""The Triton kernels of :mod:`leanformer.ops.shaped_mix`: shaped attention's causal mix, forward and backward.

Imported only by that module, on its first launch (so Triton is needed only when they run, and
``TRITON_INTERPRET`` is read then). One program takes one (batch row, head), ``BLOCK_D`` value columns and one
chunk of ``CHUNK_T`` positions, and scans its chunk in tiles of ``BLOCK_T`` positions, in float32, carrying the
running sum from tile to tile; a chunk starts from the sum of the chunks before it (forward) or after it
(backward), which :func:`chunk_sums_kernel` and a prefix sum over chunks provide when there is more than one:

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
def chunk_sums_kernel(X, SUMS, T, H, D, sx_b, sx_h, sx_t, CHUNK_T,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PER_POSITION: tl.constexpr):
    """SUMS[b, h, c, :] (float32, (B, H, n_chunks, D) contiguous) = Σ over chunk c's positions of x_t, or of
    x_t / (t+1) with PER_POSITION: the carries a chunk starts from come from these (the caller's prefix sums)."""
    bh, c = tl.program_id(0), tl.program_id(2)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    xb = b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    end = tl.minimum(T, (c + 1) * CHUNK_T)
    for t0 in range(c * CHUNK_T, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < end)[:, None] & (cols < D)[None, :]
        x = _tile(X, xb, t, cols, sx_t, mask)
        if PER_POSITION:
            x = x / (t + 1).to(tl.float32)[:, None]
        acc += tl.sum(x, axis=0)
    n_chunks = tl.num_programs(2)
    tl.store(SUMS + (bh.to(tl.int64) * n_chunks + c) * D + cols, acc, mask=cols < D)


@triton.jit
def _carry_in(CARRY, bh, c, n_chunks, D, cols, HAS_CARRY: tl.constexpr, BLOCK_D: tl.constexpr):
    if HAS_CARRY:
        return tl.load(CARRY + (bh.to(tl.int64) * n_chunks + c) * D + cols, mask=cols < D, other=0.0)
    return tl.zeros((BLOCK_D,), dtype=tl.float32)


@triton.jit
def shaped_mix_fwd_kernel(V, S, ALPHA, BETA, GAMMA, OUT, CARRY, T, H, D, CHUNK_T,
                          sv_b, sv_h, sv_t, ss_b, ss_h, ss_t, so_b, so_h, so_t,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CARRY: tl.constexpr):
    """OUT (B, H, T, D) = α v + β s − γ · causal running mean of v, for one (b, h), BLOCK_D columns and one
    chunk of CHUNK_T positions, starting from CARRY[b, h, chunk] (the sum of v before the chunk; zero without
    HAS_CARRY, i.e. one chunk)."""
    bh, c = tl.program_id(0), tl.program_id(2)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    alpha, beta = tl.load(ALPHA + h).to(tl.float32), tl.load(BETA + h).to(tl.float32)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    vb, sb = b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h, b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h
    ob = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    carry = _carry_in(CARRY, bh, c, tl.num_programs(2), D, cols, HAS_CARRY, BLOCK_D)
    end = tl.minimum(T, (c + 1) * CHUNK_T)
    for t0 in range(c * CHUNK_T, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < end)[:, None] & (cols < D)[None, :]
        v = _tile(V, vb, t, cols, sv_t, mask)
        s = _tile(S, sb, t, cols, ss_t, mask)
        mean = (carry[None, :] + tl.cumsum(v, axis=0)) / (t + 1).to(tl.float32)[:, None]
        out = alpha * v + beta * s - gamma * mean
        tl.store(OUT + ob + t[:, None].to(tl.int64) * so_t + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        carry += tl.sum(v, axis=0)


@triton.jit
def shaped_mix_bwd_kernel(V, S, DOUT, ALPHA, BETA, GAMMA, DV, DS, PART, CARRY, T, H, D, CHUNK_T,
                          sv_b, sv_h, sv_t, ss_b, ss_h, ss_t, sg_b, sg_h, sg_t, sdv_b, sdv_h, sdv_t,
                          sds_b, sds_h, sds_t,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CARRY: tl.constexpr):
    """dv (the mix's part of it), ds and this program's partial (dα, dβ, dγ) at PART[b, h, column block, chunk],
    scanning its chunk backwards from CARRY[b, h, chunk] (Σ dout_i / (i+1) after the chunk)."""
    bh, c = tl.program_id(0), tl.program_id(2)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    alpha, beta = tl.load(ALPHA + h).to(tl.float32), tl.load(BETA + h).to(tl.float32)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    vb, sb, gb = b64 * sv_b + h64 * sv_h, b64 * ss_b + h64 * ss_h, b64 * sg_b + h64 * sg_h
    dvb, dsb = b64 * sdv_b + h64 * sdv_h, b64 * sds_b + h64 * sds_h
    carry = _carry_in(CARRY, bh, c, tl.num_programs(2), D, cols, HAS_CARRY, BLOCK_D)
    d_alpha = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_beta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_gamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = c * CHUNK_T
    end = tl.minimum(T, first + CHUNK_T)
    n_tiles = tl.cdiv(end - first, BLOCK_T)
    for i in range(0, n_tiles):
        t = first + (n_tiles - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (t < end)[:, None] & (cols < D)[None, :]
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
    out = PART + ((bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + c) * 3
    tl.store(out, tl.sum(d_alpha, axis=0))
    tl.store(out + 1, tl.sum(d_beta, axis=0))
    tl.store(out + 2, tl.sum(d_gamma, axis=0))
