"""LayerNorm in the prologue and a residual in the epilogue of the few-row product
(:mod:`leanformer.ops.norm_linear`): against float64 and the eager ops, and its refusals.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from decoding_routes import assert_same_decoding, decode_each_route  # noqa: E402
from leanformer.ops import norm_linear as nl  # noqa: E402
from leanformer.ops import skinny_linear  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def _inputs(lead, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(*lead, K, generator=g) * 3 + 1, w=torch.randn(N, K, generator=g) / K ** 0.5,
             b=torch.randn(N, generator=g), g=1 + 0.2 * torch.randn(K, generator=g),
             be=0.1 * torch.randn(K, generator=g), r=torch.randn(*lead, N, generator=g))
    return {k: v.to(DEV, dtype) for k, v in t.items()}


def _float64(t, dtype, norm, ln_bias, residual, activation):
    """The eager recipe in float64, rounded to ``dtype`` where the eager ops round: the norm's output, the
    product (+ bias), the activation, the sum with the residual."""
    def rnd(y):
        return y.to(dtype).double()
    x = t["x"].double()
    if norm:
        x = rnd(F.layer_norm(x, (x.shape[-1],), t["g"].double(), t["be"].double() if ln_bias else None, 1e-5))
    y = rnd(F.linear(x, t["w"].double(), t["b"].double()))
    if activation:
        y = rnd(F.gelu(y))
    return rnd(t["r"].double() + y) if residual else y


@pytest.mark.parametrize("lead,K,N", [((5,), 96, 80), ((2, 1), 200, 40), ((32,), 64, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("norm,ln_bias,residual,activation", [(True, True, False, False), (False, False, True, False),
                                                             (True, False, True, True)],
                         ids=["norm", "residual", "norm-no-shift+gelu+residual"])
def test_kernel_equals_the_eager_ops_and_float64(lead, K, N, dtype, norm, ln_bias, residual, activation):
    """float32: within float32 rounding of float64; bf16: equal to the eager ops (F.layer_norm, F.linear,
    GELU, the residual sum) on ≥ 99% of elements and to the float64 recipe rounded as they round on ≥ 98%
    (the rest one rounding apart: a variance or product summed in another order)."""
    t = _inputs(lead, K, N, dtype, seed=K)
    kw = dict(norm=(t["g"], t["be"] if ln_bias else None, 1e-5) if norm else None,
              residual=t["r"] if residual else None, activation="gelu" if activation else None)
    y = nl.norm_linear(t["x"], t["w"], t["b"], **kw)
    assert y.shape == (*lead, N) and y.dtype == dtype
    ref = _float64(t, dtype, norm, ln_bias, residual, activation)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    if dtype == torch.float32:
        assert err <= 2e-6
    else:
        assert float((y == nl.reference(t["x"], t["w"], t["b"], **kw)).float().mean()) >= 0.99
        assert float((y.double() == ref).float().mean()) >= 0.98 and err <= 2 ** -7


def test_refusals_name_the_problem():
    t = _inputs((3,), 64, 32, torch.float32)
    cases = [
        (dict(norm=(t["g"][:10], None, 1e-5)), r"norm's weight must be a contiguous \(64,\)"),
        (dict(residual=t["r"][:, :5]), r"residual must be \(3, 32\)"),
        (dict(residual=t["r"].double()), "residual must be"),
        (dict(activation="tanh"), "not one of the kernel's"),
        (dict(norm=(None, None, 1e-5)), "needs its weight"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            nl.norm_linear(t["x"], t["w"], t["b"], **kw)
    with torch.enable_grad(), pytest.raises(ValueError, match="no backward"):
        nl.norm_linear(t["x"], t["w"], t["b"], norm=(t["g"].clone().requires_grad_(True), None, 1e-5))
    with pytest.raises(ValueError, match="40 rows"):
        nl.norm_linear(torch.zeros(40, 64, device=DEV), t["w"], t["b"])


@pytest.mark.parametrize("attention", ["softmax", "dijiang"])
def test_decoding_copy_hands_norms_and_residuals_to_the_products(attention, monkeypatch):
    """A decoding copy's Pre-LN blocks become DecodePreLNBlocks (state_dict unchanged); with the kernel routed
    ("always": prefill and steps), every layer's four products run it (input product with the norm, output
    product with the residual, MLP in with the norm and GELU, MLP out with the residual), and the copy decodes
    the tokens of the eager route, logits within float32 rounding."""
    from leanformer import TransformerConfig, TransformerLM
    from leanformer.blocks.standard import DecodePreLNBlock
    from leanformer.decoding import decoding_copy
    from leanformer.ops import skinny_linear

    cfg = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0,
                            attention=attention)
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(DEV).eval()
    copy = decoding_copy(model, torch.float32)
    assert list(copy.state_dict()) == list(model.state_dict())
    assert all(type(b) is DecodePreLNBlock for b in copy.blocks)
    monkeypatch.setattr(skinny_linear, "ROUTE", "always")
    out = decode_each_route(copy, nl, "_norm_linear_op", monkeypatch, DEV)
    assert [len(out[r][2]) for r in ("never", "always")] == [0, 4 * 4 * cfg.n_layers]  # prefill + 3 steps
    assert_same_decoding(out)


def test_multiply_add_blocks_with_norm_and_residual(monkeypatch):
    """The few-row kernel's FMA path (skinny_linear.FMA_COLUMNS) keeps the LayerNorm prologue, the activation and
    the residual epilogue: float32 within float32 rounding of the float64 recipe."""
    monkeypatch.setattr(skinny_linear, "FMA_COLUMNS", 4)
    t = _inputs((3,), 200, 40, torch.float32, seed=3)
    y = nl.norm_linear(t["x"], t["w"], t["b"], norm=(t["g"], t["be"], 1e-5), residual=t["r"], activation="gelu")
    ref = _float64(t, torch.float32, True, True, True, True)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 2e-6
