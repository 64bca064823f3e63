"""NOBLE's CosNet kernels (:mod:`leanformer.ops.cosnet`) against the float64 PyTorch form: the output, the
gradient to z and to every parameter, strided and multi-axis inputs, bf16, a row count that is not a
multiple of the block, empty input, refusals, torch.compile, and a NobleLinear on the kernel route.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The
kernels compute in float32: float32 inputs are asserted within 1e-5 of float64 (relative to the largest
reference value), bf16 within the bf16 rounding of z and s.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer.layers import noble  # noqa: E402
from leanformer.layers.noble import CosNet, NobleLinear  # noqa: E402
from leanformer.ops import cosnet as ck  # noqa: E402

F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 1e-5
BF16_TOL = 3e-2
PARAMS = ("omega1", "phi1", "M.weight", "M.bias", "omega2", "phi2")

if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _net(r: int, seed: int = 0) -> CosNet:
    torch.manual_seed(seed)
    net = CosNet(r, dtype=F64)
    with torch.no_grad():  # wider than the init, so every term matters
        net.M.weight.normal_(0, 1.0 / r ** 0.5)
        net.omega1.uniform_(0.5, 2.0)
        net.omega2.uniform_(0.5, 2.0)
    return net


def _run(net: CosNet, z: torch.Tensor, g: torch.Tensor, kernel: bool):
    """s and the gradients (z, then PARAMS) of Σ s ⊙ g, through the kernel or the float64 PyTorch form."""
    params = dict(net.named_parameters())
    z = z.detach().requires_grad_()
    if kernel:
        s = ck.cosnet(z, *(params[n] for n in PARAMS[:2]), params["M.weight"], params["M.bias"],
                      *(params[n] for n in PARAMS[4:]))
    else:
        s = net(z)
    grads = torch.autograd.grad((s.double() * g).sum(), [z] + [params[n] for n in PARAMS])
    return s, grads


@pytest.mark.parametrize("r", [16, 32, 64])
@pytest.mark.parametrize("n", [1, 200])
def test_matches_float64_with_every_gradient(r, n):
    net = _net(r)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, r, dtype=F64, generator=g) * 2
    gs = torch.randn(n, r, dtype=F64, generator=g)
    s_ref, g_ref = _run(net, z, gs, kernel=False)
    net32 = _net(r).float().to(DEV)
    s, grads = _run(net32, z.float().to(DEV), gs.to(DEV), kernel=True)
    assert s.shape == (n, r) and s.dtype == torch.float32
    assert rel(s, s_ref) < FP32_TOL
    for name, a, b in zip(("z",) + PARAMS, grads, g_ref):
        assert a.shape == b.shape, name
        assert rel(a, b) < FP32_TOL, name


def test_strided_multi_axis_input_keeps_its_shape():
    """z as a column block of a wider product (the stacked NOBLE form's split), (B, T, r)."""
    net = _net(32)
    wide = torch.randn(3, 70, 100, dtype=F64, generator=torch.Generator().manual_seed(2))
    z = wide[..., 60:92]
    gs = torch.randn(3, 70, 32, dtype=F64)
    s_ref, g_ref = _run(net, z, gs, kernel=False)
    s, grads = _run(_net(32).float().to(DEV), z.float().to(DEV), gs.to(DEV), kernel=True)
    assert s.shape == (3, 70, 32)
    assert rel(s, s_ref) < FP32_TOL
    for name, a, b in zip(("z",) + PARAMS, grads, g_ref):
        assert rel(a, b) < FP32_TOL, name


def test_bf16_input():
    net = _net(32)
    z = torch.randn(300, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    zb = z.to(torch.bfloat16)
    gs = torch.randn(300, 32, dtype=F64)
    s_ref, g_ref = _run(net, zb.double(), gs, kernel=False)  # the reference sees the same rounded z
    s, grads = _run(_net(32).float().to(DEV), zb.to(DEV), gs.to(DEV), kernel=True)
    assert s.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert rel(s, s_ref) < BF16_TOL
    for name, a, b in zip(("z",) + PARAMS, grads, g_ref):
        assert rel(a, b) < BF16_TOL, name


def test_transposed_input_and_bf16_parameters():
    """z whose last axis is not unit-stride (copied once), parameters stored in bf16 (read as float32)."""
    net = _net(32)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.to(torch.bfloat16))  # the reference sees the same rounded parameters
    zt = torch.randn(32, 150, dtype=F64, generator=torch.Generator().manual_seed(5))
    gs = torch.randn(150, 32, dtype=F64)
    s_ref, g_ref = _run(net, zt.t(), gs, kernel=False)
    net_bf16 = _net(32)
    net_bf16.load_state_dict(net.state_dict())
    net_bf16 = net_bf16.to(device=DEV, dtype=torch.bfloat16)
    z = zt.float().to(DEV).t()
    assert z.stride(-1) != 1
    s, grads = _run(net_bf16, z, gs.to(DEV), kernel=True)
    assert s.dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert rel(s, s_ref) < FP32_TOL
    for name, a, b in zip(("z",) + PARAMS, grads, g_ref):
        assert rel(a, b) < BF16_TOL, name


def test_noble_layer_under_autocast_bf16(monkeypatch):
    """Autocast's bf16 z with float32 parameters: the layer's output within bf16 rounding of float64."""
    monkeypatch.setattr(noble, "COSNET_KERNEL", "always")
    torch.manual_seed(6)
    layer = NobleLinear(64, 48, rank=32, dtype=F64)
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.2)
    x = torch.randn(3, 40, 64, dtype=F64)
    ref = layer.forward_reference(x)
    lay32 = layer.float().to(DEV)
    xd = x.float().to(DEV).requires_grad_()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = lay32(xd)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < BF16_TOL
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lay32.parameters())


def test_empty_input():
    net = _net(16).float().to(DEV)
    s, grads = _run(net, torch.zeros(0, 16, device=DEV), torch.zeros(0, 16, dtype=F64, device=DEV), kernel=True)
    assert s.shape == (0, 16)
    assert all(float(gr.abs().sum()) == 0 for gr in grads[1:])


def test_refusals_name_the_problem():
    net = _net(16).float()
    p = [net.omega1, net.phi1, net.M.weight, net.M.bias, net.omega2, net.phi2]
    with pytest.raises(ValueError, match="rank r=24 must be a power of two"):
        ck.cosnet(torch.randn(4, 24, device=DEV), *p)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        ck.cosnet(torch.randn(4, 16, dtype=F64, device=DEV), *p)
    with pytest.raises(ValueError, match=r"omega2 must be \(16,\)"):
        ck.cosnet(torch.randn(4, 16, device=DEV), *p[:4], torch.ones(8), p[5])
    with pytest.raises(ValueError, match="rank r=128 is above 64"):
        ck.cosnet(torch.randn(4, 128, device=DEV), *[torch.ones(128)] * 2, torch.ones(128, 128),
                  *[torch.ones(128)] * 3)
    with pytest.raises(ValueError, match=r"M must be \(16, 16\)"):
        ck.cosnet(torch.randn(4, 16, device=DEV), p[0], p[1], torch.ones(16, 8), *p[3:])


def test_torch_compile_fullgraph():
    net = _net(32).float().to(DEV)
    params = [net.omega1, net.phi1, net.M.weight, net.M.bias, net.omega2, net.phi2]
    z = torch.randn(130, 32, device=DEV, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(ck.cosnet, fullgraph=True, backend="aot_eager" if DEV.type == "cpu" else "inductor")
    s = f(z, *params)
    s_eager = ck.cosnet(z, *params)
    torch.testing.assert_close(s, s_eager)
    g = torch.autograd.grad(s.sum(), [z] + params)
    g_eager = torch.autograd.grad(s_eager.sum(), [z] + params)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_noble_layer_on_the_kernel_route(monkeypatch):
    """COSNET_KERNEL routes a NobleLinear's CosNet through the kernels; the layer stays the float64 function."""
    monkeypatch.setattr(noble, "COSNET_KERNEL", "always")
    torch.manual_seed(4)
    layer = NobleLinear(24, 40, rank=16, dtype=F64)
    with torch.no_grad():
        layer.up.weight.normal_()
    x = torch.randn(2, 9, 24, dtype=F64)
    calls = []
    real = ck.cosnet

    def counted(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(ck, "cosnet", counted)
    ref = layer.forward_reference(x)  # float64 z: the kernels refuse it, PyTorch form
    assert not calls
    lay32 = layer.float().to(DEV)
    out = lay32(x.float().to(DEV))
    assert calls
    assert rel(out, ref) < FP32_TOL
    monkeypatch.setattr(noble, "COSNET_KERNEL", "sometimes")
    with pytest.raises(ValueError, match="COSNET_KERNEL"):
        lay32(x.float().to(DEV))


def test_half_precision_parameters_are_read_without_cast_launches():
    """A bf16 decoding copy's CosNet (z and parameters bf16, no gradient): the op gets the parameters as stored,
    so no cast runs before the kernel; the result is the float64 form's within bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.copy_):
                Casts.count += 1
            return func(*args, **(kwargs or {}))
    net = _net(32)
    z = torch.randn(8, 32, dtype=F64, generator=torch.Generator().manual_seed(9))
    ref = net(z)
    half = CosNet(32).to(DEV, torch.bfloat16)
    half.load_state_dict(net.state_dict())
    params = dict(half.named_parameters())
    zh = z.to(DEV, torch.bfloat16)
    with torch.no_grad(), Casts():
        s = ck.cosnet(zh, params["omega1"], params["phi1"], params["M.weight"],
                      params["M.bias"], params["omega2"], params["phi2"])
    assert Casts.count == 0
    assert s.dtype == torch.bfloat16 and rel(s, ref) < BF16_TOL
