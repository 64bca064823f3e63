"""The Triton kernels of :mod:`leanformer.ops.feature_map`: DiJiang's feature map, forward and backward.

Imported only by that module, on its first launch (so Triton is needed only when they run, and
``TRITON_INTERPRET`` is read then). One program takes ``BLOCK_T`` tokens of one (batch row, head):

    z = IN_SCALE · (x @ P) + log_d[h],    x: (BLOCK_T, D), P: (D, M) float32, z: (BLOCK_T, M) float32

then, by ``MODE``: 0 ``exp(z − max_f z)`` and the row maxima; 1 ``exp(z − shift_t)`` with a given shift per
token; 2 ``softmax(z)`` over the features; 3 the row maxima alone. The backward recomputes z from x (no
features are saved) and returns dx = IN_SCALE · (dz @ Pᵀ) and, per program, the column sums of dz (the
log_d gradient's partial sums), with dz = dF ⊙ f (modes 0 and 1: the shift is a constant to the gradient)
or f ⊙ (dF − Σ_f dF ⊙ f) (softmax).

Products in float32 accuracy on bf16 tensor cores (``split_dot``): the float32 operand of each product is
split into bf16 pieces, hi + mid (+ lo), and the piece products that matter summed in float32. The exp
that follows amplifies z's absolute error into the features' relative error, so a plain bf16 or TF32
product (≈ 2^-9 or 2^-11 relative) is not enough; the split gives ≈ 2^-17 relative, at 3 to 5 bf16 products
per tile instead of FFMA's float32 rate. The error is relative to Σ|x||P| (z's absolute error, which the exp
turns into the features' relative error): measured on an H100 at D = M = 128 (review, 2026-12-05) 2.9e-5
(float32 x of std 3) to 9.8e-5 (std 12), bf16 x 5.7e-6 to 1.8e-5. Under the interpreter (no bf16 ``tl.dot``
there) the same pieces are multiplied in float32, so CPU tests check the splitting too.
"""

import triton
import triton.language as tl


@triton.jit
def split3(a):
    """A float32 tile as three bf16 pieces hi + mid + lo (≈ 24 bits of mantissa)."""
    hi = a.to(tl.bfloat16)
    r = a - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def piece_dot(a, b, INTERPRET: tl.constexpr):
    """``a @ b`` of two bf16 pieces, float32 accumulation (the interpreter: the same values in float32)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def split_dot(a, b, SPLIT_A: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b`` for float32 tiles a (R, K), b (K, N) → (R, N) float32, to ≈ 2^-17 relative.

    b is split in three pieces; a in two when SPLIT_A, else a is taken as its bf16 rounding (exact when a
    holds bf16 values). The products of pieces below 2^-16 of the leading one are left out."""
    b_hi, b_mid, b_lo = split3(b)
    a_hi = a.to(tl.bfloat16)
    acc = piece_dot(a_hi, b_hi, INTERPRET)
    acc += piece_dot(a_hi, b_mid, INTERPRET)
    acc += piece_dot(a_hi, b_lo, INTERPRET)
    if SPLIT_A:
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        acc += piece_dot(a_lo, b_hi, INTERPRET)
        acc += piece_dot(a_lo, b_mid, INTERPRET)
    return acc


@triton.jit
def log_features(x_ptr, p_ptr, logd_ptr, H, T, sxb, sxh, sxt, sxd, D: tl.constexpr, M: tl.constexpr,
                 BLOCK_T: tl.constexpr, IN_SCALE: tl.constexpr, HAS_LOG_D: tl.constexpr, SPLIT_X: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """This program's block (grid (cdiv(T, BLOCK_T), B·H)): z = IN_SCALE · (x @ P) + log_d[h] for its tokens,
    (BLOCK_T, M) float32 (rows past T hold log_d; the callers mask them), and b, h, the token offsets and
    their mask (int64: a (B, H, T, D) view may span ≥ 2^31 elements)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, M)
    x = tl.load(x_ptr + b * sxb + h * sxh + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
                mask=mask_t[:, None], other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs_d[:, None] * M + offs_m[None, :])
    z = split_dot(x, p, SPLIT_X, INTERPRET) * IN_SCALE
    if HAS_LOG_D:
        z += tl.load(logd_ptr + h * M + offs_m)[None, :]
    return z, b, h, offs_t, mask_t


@triton.jit
def features_fwd_kernel(x_ptr, p_ptr, logd_ptr, shift_ptr, f_ptr, rowmax_ptr,
                        sxb, sxh, sxt, sxd, ssb, ssh, sst, sfb, sfh, sft, sfm, H, T,
                        D: tl.constexpr, M: tl.constexpr, BLOCK_T: tl.constexpr, IN_SCALE: tl.constexpr,
                        HAS_LOG_D: tl.constexpr, MODE: tl.constexpr, SPLIT_X: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), B·H). Writes f (B, H, T, M) at its strides (modes 0-2) and, for modes 0
    and 3, the row maxima to ``rowmax_ptr`` ((B, H, T) contiguous float32)."""
    z, b, h, offs_t, mask_t = log_features(x_ptr, p_ptr, logd_ptr, H, T, sxb, sxh, sxt, sxd, D, M, BLOCK_T,
                                           IN_SCALE, HAS_LOG_D, SPLIT_X, INTERPRET)
    if MODE == 1:
        shift = tl.load(shift_ptr + b * ssb + h * ssh + offs_t * sst, mask=mask_t, other=0.0)
        f = tl.exp(z - shift[:, None])
    else:
        mx = tl.max(z, axis=1)
        if MODE != 2:
            tl.store(rowmax_ptr + (b * H + h) * T + offs_t, mx, mask=mask_t)
        f = tl.exp(z - mx[:, None])
        if MODE == 2:
            f = f / tl.sum(f, axis=1)[:, None]
    if MODE != 3:
        offs_m = tl.arange(0, M)
        tl.store(f_ptr + b * sfb + h * sfh + offs_t[:, None] * sft + offs_m[None, :] * sfm,
                 f.to(f_ptr.dtype.element_ty), mask=mask_t[:, None])


@triton.jit
def features_bwd_kernel(x_ptr, p_ptr, logd_ptr, shift_ptr, df_ptr, dx_ptr, dlogd_ptr,
                        sxb, sxh, sxt, sxd, ssb, ssh, sst, sgb, sgh, sgt, sgm, sdb, sdh, sdt, sdd, B, H, T,
                        D: tl.constexpr, M: tl.constexpr, BLOCK_T: tl.constexpr, IN_SCALE: tl.constexpr,
                        HAS_LOG_D: tl.constexpr, SOFTMAX: tl.constexpr, SPLIT_X: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), B·H). dx (B, H, T, D) at its strides; with HAS_LOG_D the column sums of dz
    to ``dlogd_ptr`` ((cdiv(T, BLOCK_T), B, H, M) contiguous float32: one row per program)."""
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    z, b, h, offs_t, mask_t = log_features(x_ptr, p_ptr, logd_ptr, H, T, sxb, sxh, sxt, sxd, D, M, BLOCK_T,
                                           IN_SCALE, HAS_LOG_D, SPLIT_X, INTERPRET)
    df = tl.load(df_ptr + b * sgb + h * sgh + offs_t[:, None] * sgt + offs_m[None, :] * sgm,
                 mask=mask_t[:, None], other=0.0).to(tl.float32)  # 0 past T: those rows give dz = 0
    if SOFTMAX:
        f = tl.exp(z - tl.max(z, axis=1)[:, None])
        f = f / tl.sum(f, axis=1)[:, None]
        dz = f * (df - tl.sum(df * f, axis=1)[:, None])
    else:
        shift = tl.load(shift_ptr + b * ssb + h * ssh + offs_t * sst, mask=mask_t, other=0.0)
        dz = df * tl.exp(z - shift[:, None])
    dz = tl.where(mask_t[:, None], dz, 0.0)  # rows past T: 0, not 0·inf (their z is log_d alone)
    p_t = tl.load(p_ptr + offs_m[:, None] + offs_d[None, :] * M)  # Pᵀ: (M, D)
    dx = split_dot(dz, p_t, True, INTERPRET) * IN_SCALE
    tl.store(dx_ptr + b * sdb + h * sdh + offs_t[:, None] * sdt + offs_d[None, :] * sdd,
             dx.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None])
    if HAS_LOG_D:
        block = tl.program_id(0).to(tl.int64) * B * H + b * H + h
        tl.store(dlogd_ptr + block * M + offs_m, tl.sum(dz, axis=0))
