"""A NOBLE layer for a decoding step's few rows in one kernel (:mod:`leanformer.ops.noble_decode`): against
float64 and the layer's eager forward, its refusals, and a decoding copy of a NOBLE model that decodes the
same tokens through it.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer import NobleConfig, TransformerConfig, TransformerLM  # noqa: E402
from decoding_routes import assert_same_decoding, decode_each_route  # noqa: E402
from leanformer.decoding import decoding_copy  # noqa: E402
from leanformer.layers.noble import NobleLinear  # noqa: E402
from leanformer.ops import noble_decode as nd  # noqa: E402
from leanformer.ops import skinny_linear as sl  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def _layer(K, N, rank=32, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    layer = NobleLinear(K, N, bias=bias, rank=rank, fused=False, **kw).eval()
    with torch.no_grad():
        layer.up.weight.normal_(0.0, 0.3)  # the paper's zero-initialised W_up would hide the branch
        if bias:
            layer.bias.normal_(0.0, 0.5)
    return layer.requires_grad_(False)


@pytest.mark.parametrize("lead,K,N,bias", [((5,), 96, 80, True), ((2, 1), 200, 40, False), ((32,), 64, 130, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_kernel_equals_the_layer_and_float64(lead, K, N, bias, dtype, monkeypatch):
    """float32: within float32 rounding of float64; bf16: as close to float64 as the eager bf16 layer (which
    rounds inside CosNet too), and equal on ≥ 95% of elements to the layer's ops with CosNet in float32.
    K not a multiple of the block (200), N not of BLOCK_N (40, 130), leading axes kept, no bias."""
    layer = _layer(K, N, bias=bias)
    x = torch.randn(*lead, K, generator=torch.Generator().manual_seed(1))
    ref = layer.double().forward_reference(x.double())
    layer = layer.to(DEV, dtype)
    xx = x.to(DEV, dtype)
    monkeypatch.setattr(nd, "ROUTE", "always")
    y = nd.noble_linear(layer, xx)
    assert y is not None and y.shape == (*lead, N) and y.dtype == dtype
    err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
    if dtype == torch.float32:
        assert err <= 2e-6
    else:
        eager = layer(xx)
        eager_err = float((eager.double().cpu() - ref).abs().max() / ref.abs().max())
        assert err <= max(2 * eager_err, 2 ** -7)
        assert float((y == _layer_with_float32_cosnet(layer, xx)).float().mean()) >= 0.95


def _layer_with_float32_cosnet(layer, x):
    """The layer's eager ops and roundings (main, z, the branch, the sum in x's dtype) with CosNet in float32
    and its output rounded once: the kernel's recipe, in PyTorch."""
    F = torch.nn.functional
    act = layer.act
    main, z = F.linear(x, layer.weight, layer.bias), F.linear(x, layer.down.weight, layer.down.bias)
    h = torch.cos(act.omega1.float() * z.float() + act.phi1.float())
    s = torch.cos(act.omega2.float() * F.linear(h, act.M.weight.float(), act.M.bias.float()) + act.phi2.float())
    return main + F.linear(s.to(x.dtype), layer.up.weight)


def test_refusals_and_the_route(monkeypatch):
    x = torch.randn(3, 64, device=DEV)
    layer = _layer(64, 48).to(DEV)
    assert nd.noble_supported(layer, x) is None
    assert "rank 8" in nd.noble_supported(_layer(64, 48, rank=8).to(DEV), x)
    assert "plain sum" in nd.noble_supported(_layer(64, 48, fusion="gate").to(DEV), x)
    assert "plain sum" in nd.noble_supported(_layer(64, 48, activation="silu").to(DEV), x)
    assert "rows" in nd.noble_supported(layer, torch.randn(40, 64, device=DEV))
    assert "must be torch.float64 like x" in nd.noble_supported(layer, x.double())
    strided = _layer(64, 48).to(DEV)
    strided.act.omega1 = torch.nn.Parameter(torch.ones(64, device=DEV)[::2], requires_grad=False)
    assert "contiguous" in nd.noble_supported(strided, x)
    mixed = _layer(64, 48).to(DEV)
    mixed.act.phi2.data = mixed.act.phi2.data.double()
    assert "parameters must be torch.float32" in nd.noble_supported(mixed, x)
    # W_down's tiles count in the pipeline's shared memory: float32, r 128 gets fewer stages
    assert sl.launch_config(32, 768, 768, torch.float32, extra_rows=128)["num_stages"] < \
        sl.launch_config(32, 768, 768, torch.float32)["num_stages"]
    with torch.enable_grad():
        assert "requires grad" in nd.noble_supported(_layer(64, 48).to(DEV).requires_grad_(True), x)
    monkeypatch.setattr(nd, "ROUTE", "never")
    assert nd.noble_linear(layer, x) is None
    monkeypatch.setattr(nd, "ROUTE", "cuda")
    assert (nd.noble_linear(layer, x) is None) is (DEV.type != "cuda")


def test_decoding_copy_of_a_noble_model_decodes_the_same_through_the_kernel(monkeypatch):
    """Every NOBLE layer of the copy runs the kernel (ROUTE "always": prefill and steps), and the copy decodes
    the tokens it decodes without it, logits within float32 rounding."""
    cfg = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0,
                            noble=NobleConfig(enabled=True, rank=16))
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(DEV).eval()
    for m in model.modules():
        if isinstance(m, NobleLinear):
            with torch.no_grad():
                m.up.weight.normal_(0.0, 0.3)
    copy = decoding_copy(model, torch.float32)
    layers = [m for m in copy.modules() if isinstance(m, NobleLinear)]
    assert layers and all(m.decode_kernel for m in layers)
    out = decode_each_route(copy, nd, "_noble_op", monkeypatch, DEV)
    assert [len(out[r][2]) for r in ("never", "always")] == [0, 4 * len(layers)]  # prefill + 3 steps
    assert_same_decoding(out)
