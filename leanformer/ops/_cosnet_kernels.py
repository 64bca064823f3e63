"""The Triton kernels of :mod:`leanformer.ops.cosnet`: NOBLE's CosNet activation, forward and backward.

Imported only by that module, on its first launch (so Triton is needed only when they run, and
``TRITON_INTERPRET`` is read then). One program takes ``BLOCK_N`` rows of z (N, R), in float32:

    a1 = ω1 z + φ1,  h = cos a1,  u = h Mᵀ + c,  a2 = ω2 u + φ2,  s = cos a2          (NOBLE, CosNet)

The backward recomputes a1, h, u, a2 from z (nothing else is saved) and, from ds:

    g2 = −ds sin a2,  du = ω2 g2,  dh = du M,  g1 = −dh sin a1,  dz = ω1 g1

and writes, per program, the partial sums over its rows of the parameters' gradients, in this order:
dω1 = Σ g1 z, dφ1 = Σ g1, dc = Σ du, dω2 = Σ g2 u, dφ2 = Σ g2 (five rows of R), then dM = duᵀ h (R × R).
Rows past N load z = ds = 0, so every gradient they add is 0. The r × r products run in float32
(``input_precision="ieee"``: 2·R² FLOPs a row, nothing next to the layer's products).
"""

import triton
import triton.language as tl


@triton.jit
def _load_params(W1, P1, M, C, W2, P2, R: tl.constexpr):
    """The parameters in float32, whatever their stored dtype (a bf16 decoding copy passes its own)."""
    cols = tl.arange(0, R)
    w1, p1 = tl.load(W1 + cols).to(tl.float32), tl.load(P1 + cols).to(tl.float32)
    c, w2, p2 = tl.load(C + cols).to(tl.float32), tl.load(W2 + cols).to(tl.float32), tl.load(P2 + cols).to(tl.float32)
    m = tl.load(M + cols[:, None] * R + cols[None, :]).to(tl.float32)  # M[i, k], row-major (out i, in k)
    return w1, p1, m, c, w2, p2


@triton.jit
def _rows(Z, stride_z, N, R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, R)
    mask = (rows < N)[:, None]
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, z


@triton.jit
def _cosnet(z, w1, p1, m, c, w2, p2, PRECISION: tl.constexpr):
    """CosNet on float32 z (rows, R): cos(ω2 (cos(ω1 z + φ1) Mᵀ + c) + φ2), float32 (also the NOBLE decoding
    kernels' branch); ``PRECISION``: the R × R product's ("ieee": float32 by FMAs; "tf32": tensor cores)."""
    h = tl.cos(z * w1[None, :] + p1[None, :])
    u = tl.dot(h, tl.trans(m), input_precision=PRECISION) + c[None, :]
    return tl.cos(u * w2[None, :] + p2[None, :])


@triton.jit
def cosnet_fwd_kernel(Z, W1, P1, M, C, W2, P2, S, stride_z, stride_s, N,
                      R: tl.constexpr, BLOCK_N: tl.constexpr):
    """s = cos(ω2 (cos(ω1 z + φ1) Mᵀ + c) + φ2) for BLOCK_N rows of z (N, R); s in S's dtype."""
    rows, cols, mask, z = _rows(Z, stride_z, N, R, BLOCK_N)
    w1, p1, m, c, w2, p2 = _load_params(W1, P1, M, C, W2, P2, R)
    s = _cosnet(z, w1, p1, m, c, w2, p2, "ieee")
    tl.store(S + rows[:, None] * stride_s + cols[None, :], s.to(S.dtype.element_ty), mask=mask)


@triton.jit
def cosnet_bwd_kernel(Z, DS, W1, P1, M, C, W2, P2, DZ, PART, stride_z, stride_ds, stride_dz, N,
                      R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz (N, R) in DZ's dtype and this program's partial parameter gradients, PART[pid] (5 R + R², float32)."""
    rows, cols, mask, z = _rows(Z, stride_z, N, R, BLOCK_N)
    ds = tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _cosnet_backward(z, ds, W1, P1, M, C, W2, P2, DZ, PART, rows, cols, mask, stride_dz, R)


@triton.jit
def _cosnet_backward(z, ds, W1, P1, M, C, W2, P2, DZ, PART, rows, cols, mask, stride_dz, R: tl.constexpr):
    """From float32 z and ds (rows, R), zero on masked rows: store dz at ``rows`` and this program's partial
    parameter gradients at PART[pid] (the module docstring's order)."""
    w1, p1, m, c, w2, p2 = _load_params(W1, P1, M, C, W2, P2, R)
    a1 = z * w1[None, :] + p1[None, :]
    h = tl.cos(a1)
    u = tl.dot(h, tl.trans(m), input_precision="ieee") + c[None, :]
    g2 = -ds * tl.sin(u * w2[None, :] + p2[None, :])
    du = g2 * w2[None, :]
    g1 = -tl.dot(du, m, input_precision="ieee") * tl.sin(a1)
    tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], (g1 * w1[None, :]).to(DZ.dtype.element_ty), mask=mask)
    out = PART + tl.program_id(0).to(tl.int64) * (5 * R + R * R)
    tl.store(out + cols, tl.sum(g1 * z, axis=0))
    tl.store(out + R + cols, tl.sum(g1, axis=0))
    tl.store(out + 2 * R + cols, tl.sum(du, axis=0))
    tl.store(out + 3 * R + cols, tl.sum(g2 * u, axis=0))
    tl.store(out + 4 * R + cols, tl.sum(g2, axis=0))
    dm = tl.dot(tl.trans(du), h, input_precision="ieee")  # dM[i, k] = Σ_rows du[:, i] h[:, k]
    tl.store(out + 5 * R + cols[:, None] * R + cols[None, :], dm)
