"""NOBLE's rank-r products with CosNet fused beside them, for the training route (:mod:`leanformer.ops.noble_train`).

    down_cosnet:          z = x W_downᵀ + b_down,  s = σ(z)                         x (N, K), W_down (r, K)
    up_grad_cosnet_bwd:   ds = dy W_up,  dz and dθ_σ = σ's backward at z            dy (N, K), W_up (K, r)

(σ = CosNet, :mod:`leanformer.ops.cosnet`.) Each is one Triton launch reading x or dy once
(:mod:`leanformer.ops._noble_branch_kernels`), where the route's plain form takes a cuBLAS rank-r product and a
CosNet kernel (two launches and a round trip of the (N, r) tensor). Ops registered as
:mod:`leanformer.ops.fused_decay_attention`'s are (``torch.compile`` traces them); no autograd of their own.
Supported where :func:`leanformer.ops.cosnet.cosnet_supported` accepts z (r a power of two in [16, 64]).
"""

from __future__ import annotations

import torch

from leanformer.ops.cosnet import block_rows
from leanformer.ops.fused_decay_attention import _cdiv, _interpret, _on_device, _register, _wrap

BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
ROWS: int | None = None  # rows per program (a power of two ≥ 16); None: CosNet's kernels' choice (block_rows(r))


def _rows(r: int) -> int:
    return ROWS if ROWS is not None else block_rows(r)


def _kernels():
    from leanformer.ops import _noble_branch_kernels as kern

    return kern.down_cosnet_kernel, kern.up_grad_cosnet_bwd_kernel


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _new_zs(x, wd, bd, omega1, phi1, m, c, omega2, phi2):
    r = wd.shape[0]
    return x.new_empty(x.shape[0], r), x.new_empty(x.shape[0], r)


@_register("leanformer::noble_down_cosnet", _new_zs)
def down_cosnet(x: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, omega1: torch.Tensor, phi1: torch.Tensor,
                m: torch.Tensor, c: torch.Tensor, omega2: torch.Tensor, phi2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, s), each (N, r) in x's dtype, from x (N, K), W_down (r, K), b_down (r,) and CosNet's parameters
    (contiguous; float32 or x's dtype)."""
    N, K = x.shape
    r = wd.shape[0]
    z, s = _new_zs(x, wd, bd, omega1, phi1, m, c, omega2, phi2)
    if N:
        bn = _rows(r)
        with _on_device(x):
            _wrap(_kernels()[0])[(_cdiv(N, bn),)](
                x, wd, bd, omega1, phi1, m, c, omega2, phi2, z, s, N, K, *x.stride(), *wd.stride(), z.stride(0),
                s.stride(0), R=r, BLOCK_N=bn, BLOCK_K=BLOCK_K, EVEN_K=K % BLOCK_K == 0, PRECISION=_precision(x),
                INTERPRET=_interpret(), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return z, s


def _new_grads(dy, wu, z, omega1, phi1, m, c, omega2, phi2):
    r = z.shape[1]
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(5 * r + r * r, dtype=torch.float32)


@_register("leanformer::noble_up_grad_cosnet_bwd", _new_grads)
def up_grad_cosnet_bwd(dy: torch.Tensor, wu: torch.Tensor, z: torch.Tensor, omega1: torch.Tensor,
                       phi1: torch.Tensor, m: torch.Tensor, c: torch.Tensor, omega2: torch.Tensor, phi2: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz like z, CosNet's parameter gradients flattened as :func:`leanformer.ops.cosnet`'s backward gives them)
    from dy (N, K), W_up (K, r) and the stored z (N, r; read with unit stride along r)."""
    if z.stride(1) != 1:
        z = z.contiguous()
    N, K = dy.shape
    r = z.shape[1]
    dz, flat = _new_grads(dy, wu, z, omega1, phi1, m, c, omega2, phi2)
    if not N:
        return dz, flat.zero_()
    bn = _rows(r)
    n_prog = _cdiv(N, bn)
    partial = z.new_empty((n_prog, 5 * r + r * r), dtype=torch.float32)
    with _on_device(dy):
        _wrap(_kernels()[1])[(n_prog,)](
            dy, wu, z, omega1, phi1, m, c, omega2, phi2, dz, partial, N, K, *dy.stride(), *wu.stride(), z.stride(0),
            dz.stride(0), R=r, BLOCK_N=bn, BLOCK_K=BLOCK_K, EVEN_K=K % BLOCK_K == 0, PRECISION=_precision(dy),
            INTERPRET=_interpret(), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dz, partial.sum(dim=0)
