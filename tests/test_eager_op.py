"""Eager calls of our Triton ops bypass the custom-op dispatcher (:mod:`leanformer.ops.eager_op`) and compute the
same bits as the registered op, forward and backward; other calls (meta tensors, dispatch modes, compile) still
reach the op. Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from leanformer.ops import cosnet as ck  # noqa: E402
from leanformer.ops import eager_op  # noqa: E402
from leanformer.ops import fused_decay_attention as fda  # noqa: E402
from leanformer.ops import shaped_mix as sm  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(2, 9, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    v = torch.randn(2, 9, 2, 16, generator=g).transpose(1, 2)
    lg = torch.log1p(-torch.tensor([1 / 32, 1 / 512]))
    return [t.to(DEV).requires_grad_() for t in (q, k, v)], lg.to(DEV)


def _attention(tensors, lg):
    q, k, v = tensors
    return fda.decayed_attention(q, k, v, lg, None)


def _cosnet_inputs():
    g = torch.Generator().manual_seed(1)
    r = 16
    z = torch.randn(5, r, generator=g)
    params = [torch.rand(r, generator=g) + 0.5, 0.1 * torch.randn(r, generator=g),
              torch.randn(r, r, generator=g) / r, 0.1 * torch.randn(r, generator=g),
              torch.rand(r, generator=g) + 0.5, 0.1 * torch.randn(r, generator=g)]
    return [t.to(DEV).requires_grad_() for t in (z, *params)], None


def _cosnet(tensors, _):
    return ck.cosnet(*tensors)


def _mix_inputs():
    g = torch.Generator().manual_seed(2)
    v, s = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(2))
    gains = [torch.rand(2, generator=g) for _ in range(3)]
    return [t.to(DEV).requires_grad_() for t in (v, s, *gains)], None


def _mix(tensors, _):
    return sm.shaped_mix(*tensors)


CASES = {"decayed_attention": (_attention_inputs, _attention), "cosnet": (_cosnet_inputs, _cosnet),
         "shaped_mix": (_mix_inputs, _mix)}


def _run(case: str, fast: bool, monkeypatch):
    make, fn = CASES[case]
    monkeypatch.setattr(eager_op, "EAGER_FAST_PATH", fast)
    tensors, extra = make()
    out = fn(tensors, extra)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), tensors)
    return [out.detach(), *grads]


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_call_gives_the_registered_ops_bits(case, monkeypatch):
    for fast, op in zip(_run(case, True, monkeypatch), _run(case, False, monkeypatch)):
        assert torch.equal(fast, op)


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_eager_calls_skip_the_op_and_others_reach_it(monkeypatch):
    """A dispatch mode sees the op (the bypass is off under it); a plain eager call does not run the op."""
    tensors, lg = _attention_inputs()
    with _OpRecorder() as rec:
        _attention(tensors, lg).sum().backward()
    assert any("leanformer.decayed_attention" in op for op in rec.ops)
    assert any("leanformer.decayed_attention_bwd" in op for op in rec.ops)

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op ran")
    monkeypatch.setattr(fda._forward_op, "op", refuse)
    monkeypatch.setattr(fda._backward_op, "op", refuse)
    _attention(tensors, lg).sum().backward()  # forward and backward both direct
    monkeypatch.setattr(eager_op, "EAGER_FAST_PATH", False)
    with pytest.raises(AssertionError, match="the registered op ran"):
        _attention(tensors, lg)


def test_meta_tensors_reach_the_ops_fake_implementation():
    q, k, v = (torch.empty(2, 3, 40, 16, device="meta") for _ in range(3))
    out = fda._forward_op(q, k, v, torch.zeros(3, device="meta"), None)  # the public function refuses meta
    assert out.device.type == "meta" and out.shape == (2, 3, 40, 16)


def test_direct_calls_are_flagged_only_while_they_run():
    seen = []
    op = eager_op.EagerFastOp("test::probe", lambda x: x, lambda x: seen.append(eager_op.direct_call_active()) or x)
    op(torch.ones(1))
    assert seen == [True] and not eager_op.direct_call_active()


def test_layer_parameters_take_the_direct_path(monkeypatch):
    """nn.Parameter arguments (a layer's weights) are plain tensors too."""
    tensors, _ = _cosnet_inputs()
    params = [torch.nn.Parameter(t.detach().clone()) for t in tensors[1:]]

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op ran")
    monkeypatch.setattr(ck._cosnet_op, "op", refuse)
    monkeypatch.setattr(ck._cosnet_bwd_op, "op", refuse)
    ck.cosnet(tensors[0], *params).sum().backward()
    assert all(p.grad is not None for p in params)


def test_a_backward_op_under_create_graph_is_not_silently_detached():
    """A second derivative through an op without one fails as the registered op does, instead of giving a
    first derivative detached from the graph (which would drop a gradient penalty's term silently)."""
    (q, k, v), lg = _attention_inputs()
    gq, = torch.autograd.grad(_attention((q, k, v), lg).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        (gq ** 2).sum().backward()


def test_jit_trace_records_the_op():
    tensors, _ = _cosnet_inputs()
    plain = [t.detach() for t in tensors]
    traced = torch.jit.trace(lambda *a: ck.cosnet(*a), plain, check_trace=False)
    assert "leanformer::cosnet" in str(traced.graph)
    assert torch.equal(traced(*plain), ck.cosnet(*plain))


@pytest.mark.parametrize("feature_map", ["paper", "official"])
def test_a_dijiang_layer_on_the_kernels_gives_the_same_bits_both_ways(feature_map, monkeypatch):
    """A whole DiJiang layer (feature kernels and the fused attention kernel, a state carried across two
    prompts): output, state and every parameter's gradient are the same bits with and without the direct path."""
    from leanformer.config import DiJiangConfig, TransformerConfig
    from leanformer.layers import dijiang as dj

    monkeypatch.setattr(dj, "FEATURE_KERNEL", "always")
    cfg = TransformerConfig(vocab_size=300, d_model=64, n_heads=4, n_layers=1, attention="dijiang",
                            dijiang=DiJiangConfig(feature_map=feature_map, mode="fused")).validate()
    torch.manual_seed(0)
    layer = dj.DiJiangAttention(cfg, 0).to(DEV)
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1)).to(DEV)

    def run(fast: bool):
        monkeypatch.setattr(eager_op, "EAGER_FAST_PATH", fast)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.square().sum().backward()
        with torch.no_grad():
            state: dict = {}
            layer(x[:, :16], state)
            prompt = layer(x[:, 16:], state)
        return [out.detach(), prompt, state["S"], *(p.grad for p in layer.parameters() if p.grad is not None)]
    for fast, op in zip(run(True), run(False)):
        assert torch.equal(fast, op)
