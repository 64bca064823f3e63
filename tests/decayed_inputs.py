"""Float64 inputs of DiJiang's decayed form for the tests of its gated routes (not a test module)."""

import torch

from leanformer.layers.dijiang import running_log_norm

F64 = torch.float64


def decayed_inputs(B=2, H=3, T=9, m=5, d=4, seed=0):
    """q, k (B, H, T, m) ≥ 0, v (B, H, T, d), log γ (H,) in (log 0.7, 0], and a running log-normaliser n
    (B, H, T) of spread-out key maxima (as the paper map's: n_t ≥ n_{t−1} + log γ)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, m, dtype=F64, generator=g)
    k = torch.rand(B, H, T, m, dtype=F64, generator=g)
    v = torch.randn(B, H, T, d, dtype=F64, generator=g)
    lg = torch.log1p(-0.3 * torch.rand(H, dtype=F64, generator=g))
    n = running_log_norm(3 * torch.randn(B, H, T, dtype=F64, generator=g), lg)
    return q, k, v, lg, n
