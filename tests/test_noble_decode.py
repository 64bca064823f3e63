"""A NOBLE layer for a decoding step's few rows in one kernel (:mod:`leanformer.ops.noble_decode`): against
float64 and the layer's eager forward, its refusals, and a decoding copy of a NOBLE model that decodes the
same tokens through it; an attention's q, k, v (and gate) NOBLE layers in one launch
(:func:`leanformer.layers.fused_inputs.fuse_noble_linears`): bitwise the single-layer kernel's, following
its parameters, refusing what it cannot run; the split-K route (nd.SPLIT_K): the one-launch kernel's result but
for the float32 K-sum's association, off by default, one graph under torch.compile.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer import NobleConfig, TransformerConfig, TransformerLM  # noqa: E402
from decoding_routes import assert_same_decoding, decode_each_route  # noqa: E402
from leanformer.decoding import StaticDecoder, decoding_copy  # noqa: E402
from leanformer.layers import fused_inputs as fi  # noqa: E402
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
        if layer.down.bias is not None:  # the paper's zero b_down would hide a kernel that drops or misplaces it
            layer.down.bias.normal_(0.0, 0.5)
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


def _noble_copy(n_layers=2):
    """A decoding copy (float32) of a tiny NOBLE model, its branches' W_up off zero, and the model."""
    cfg = TransformerConfig(vocab_size=61, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=32, dropout=0.0,
                            noble=NobleConfig(enabled=True, rank=16))
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(DEV).eval()
    for m in model.modules():
        if isinstance(m, NobleLinear):
            with torch.no_grad():
                m.up.weight.normal_(0.0, 0.3)
    return decoding_copy(model, torch.float32), model


def test_decoding_copy_of_a_noble_model_decodes_the_same_through_the_kernel(monkeypatch):
    """Every NOBLE layer of the copy runs a kernel (ROUTE "always": prefill and steps), q, k, v as one launch
    per attention; the copy decodes the tokens it decodes without the kernels, logits within float32
    rounding, and with q, k, v each in its own launch, logits equal."""
    fast, model = _noble_copy()
    layers = [m for m in fast.modules() if isinstance(m, NobleLinear)]
    assert layers and all(m.decode_kernel for m in layers)
    attns = [b.attn for b in fast.blocks]
    assert all(a._fused_noble_inputs[0] == ("q", "k", "v") for a in attns)
    assert attns[0].k.weight.data_ptr() == attns[0].noble_input_weight[32:].data_ptr()  # a view, no copy
    assert set(fast.state_dict()) == set(model.state_dict())
    apart = copy.deepcopy(fast)
    for a in apart.modules():
        fi.unfuse(a)
    grouped = []
    real = nd._noble_group_op
    monkeypatch.setattr(nd, "_noble_group_op", lambda *args: grouped.append(args) or real(*args))
    out = decode_each_route(fast, nd, "_noble_op", monkeypatch, DEV)
    assert len(grouped) == 4 * len(attns)  # prefill + 3 steps, only under "always"
    assert [len(out[r][2]) for r in ("never", "always")] == [0, 4 * (len(layers) - 3 * len(attns))]
    assert_same_decoding(out)
    out["apart"] = decode_each_route(apart, nd, "_noble_op", monkeypatch, DEV, routes=("always",))["always"]
    assert len(out["apart"][2]) == 4 * len(layers) and len(grouped) == 4 * len(attns)
    assert torch.equal(out["apart"][0], out["always"][0]) and torch.equal(out["apart"][1], out["always"][1])


@pytest.mark.skipif(DEV.type == "cuda", reason="counts the custom op's launches (the interpreter's route); a "
                                               "triton_op's body is traced into the compiled graph")
def test_compiled_step_runs_the_grouped_launch(monkeypatch):
    """Under torch.compile (aot_eager) the step runs q, k, v as one launch (no staleness check in the graph)
    and decodes the eager step's tokens and logits."""
    fast, _ = _noble_copy(n_layers=1)
    monkeypatch.setattr(nd, "ROUTE", "always")
    launches = []
    real = nd._launch
    monkeypatch.setattr(nd, "_launch", lambda *args: launches.append(args[12] is not None) or real(*args))  # offsets
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1)).to(DEV)
    decs = [StaticDecoder(fast, 2, capacity=8, graph="none", compile=c) for c in ("aot_eager", False)]
    for dec in decs:
        dec.prefill(prompt)
        launches.clear()
        dec.step()
        assert launches == [True, False, False, False]  # q, k, v; o; the MLP's two
        dec.step()
    assert torch.equal(decs[0].tokens, decs[1].tokens) and torch.equal(decs[0].logits, decs[1].logits)


# ---------------------------------------------------------------------------------------------- grouped
def _attention(widths=(48, 16, 32), K=32, bias=(True, True, True), dtype=torch.float32, rank=16, **kw):
    """A module holding NOBLE layers q, k, v (and gate, for a fourth width) on one x, fused; each
    layer runs its own kernel when called (as a decoding copy's)."""
    m = torch.nn.Module()
    names = ("q", "k", "v", "gate")[:len(widths)]
    for i, (name, n, b) in enumerate(zip(names, widths, bias)):
        setattr(m, name, _layer(K, n, rank=rank, bias=b, seed=i, **kw).to(DEV, dtype))
        getattr(m, name).decode_kernel = True
    fused = fi.fuse_noble_linears(m, names)
    return m, names, fused


def _grouped(m, x, names, monkeypatch, norm=None):
    """project_inputs under no_grad with ROUTE "always", and how many grouped launches it made."""
    calls = []
    real = nd._noble_group_op
    monkeypatch.setattr(nd, "ROUTE", "always")
    monkeypatch.setattr(nd, "_noble_group_op", lambda *args: calls.append(args) or real(*args))
    with torch.no_grad():
        ys = fi.project_inputs(m, x, names, norm=norm)
    monkeypatch.setattr(nd, "_noble_group_op", real)
    return ys, len(calls)


def _each(m, x, names):
    """Each layer by the single-layer kernel (ROUTE must be "always")."""
    with torch.no_grad():
        return [nd.noble_linear(getattr(m, n), x) for n in names]


@pytest.mark.parametrize("widths,K,bias", [((48, 16, 32), 32, (True, True, True)),
                                           ((16, 32, 16), 64, (False, False, False)),
                                           ((32, 16, 16, 48), 40, (True, False, False, False))],
                         ids=["bias", "no-bias", "gate-mixed-bias-odd-K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_grouped_kernel_equals_each_layers_kernel(widths, K, bias, dtype, monkeypatch):
    """One launch for 3 or 4 layers of differing widths equals each layer's own kernel bit for bit (M = 1, 3,
    8); float32: within 2e-6 of float64 (relative to each output's largest)."""
    m, names, fused = _attention(widths, K, bias, dtype)
    assert fused and m.noble_input_offsets.tolist() == [0, *torch.tensor(widths).cumsum(0).tolist()]
    exact = [copy.deepcopy(getattr(m, n)).double().forward_reference for n in names]
    for rows in (1, 3, 8):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(DEV, dtype)
        ys, launches = _grouped(m, x, names, monkeypatch)
        assert launches == 1
        for y, ref, name, f64 in zip(ys, _each(m, x, names), names, exact):
            assert ref is not None and torch.equal(y, ref), (rows, name)
            if dtype == torch.float32:
                z = f64(x.double())
                assert float((y.double() - z).abs().max() / z.abs().max()) <= 2e-6, (rows, name)


@pytest.mark.parametrize("how", ["in place", "new parameter", "bias dropped", "load_state_dict", "no-op to",
                                 "to bf16", "replaced layer"])
def test_grouped_layers_follow_their_parameters(how, monkeypatch):
    """Whatever changes the layers after fusion, the grouped call computes with their current parameters:
    in place through the shared storage, otherwise by fusing again (or, for a layer it cannot take, by
    calling each layer)."""
    m, names, _ = _attention()
    x = torch.randn(3, 32, device=DEV)
    with torch.no_grad():
        if how == "in place":
            m.q.weight.add_(1.0)
            m.k.act.omega1.mul_(2.0)
            m.v.up.weight.neg_()
        elif how == "new parameter":
            m.v.up.weight = torch.nn.Parameter(torch.randn_like(m.v.up.weight), requires_grad=False)
        elif how == "bias dropped":
            m.k.bias = None
        elif how == "load_state_dict":
            m.load_state_dict({k: v + 0.5 for k, v in m.state_dict().items()})
        elif how == "no-op to":
            m.to(DEV)
            m.q.weight.add_(1.0)  # still reaches the stacks
        elif how == "to bf16":
            m.to(torch.bfloat16)
            x = x.bfloat16()
        else:
            m.k = _layer(32, 16, rank=32, seed=5).to(DEV)
            m.k.decode_kernel = True
    current = fi.noble_fusion_is_current(m)
    assert current is (how in ("in place", "load_state_dict", "no-op to"))  # loading copies in place
    ys, launches = _grouped(m, x, names, monkeypatch)
    assert launches == (how != "replaced layer")
    assert fi.noble_fusion_is_current(m) if launches else not hasattr(m, "_fused_noble_inputs")
    for y, ref in zip(ys, _each(m, x, names)):
        assert torch.equal(y, ref)


def test_grouped_refusals_fall_back_to_each_layer(monkeypatch):
    """Layers the kernel cannot group stay apart; a grouped module still calls each layer with a gradient
    being recorded, under ROUTE "never" and for more than 32 rows; its ``norm`` is applied first."""
    for kw in ({"rank": 8}, {"fusion": "gate"}, {"activation": "silu"}, {"dropout": 0.1}):
        assert not _attention(**kw)[2], kw
    m = torch.nn.Module()
    m.q, m.k = _layer(32, 16, rank=16), _layer(32, 16, rank=32)
    assert not fi.fuse_noble_linears(m, ("q", "k"))
    m.k = _layer(40, 16, rank=16)
    assert not fi.fuse_noble_linears(m, ("q", "k"))
    m.k = torch.nn.Linear(32, 16)
    assert not fi.fuse_noble_linears(m, ("q", "k")) and not fi.fuse_noble_linears(m, ("q",))
    m.k = _layer(32, 16, rank=16).double()
    assert not fi.fuse_noble_linears(m, ("q", "k")) and not hasattr(m, "_fused_noble_inputs")

    m, names, _ = _attention()
    stacks = [getattr(m, n) for n in fi._NOBLE_STACKS]
    x = torch.randn(3, 32, device=DEV)
    assert nd.noble_group_supported(x, *stacks, m.noble_input_offsets) is None
    assert "must be torch.float64 like x" in nd.noble_group_supported(x.double(), *stacks, m.noble_input_offsets)
    assert "rows" in nd.noble_group_supported(torch.randn(33, 32, device=DEV), *stacks, m.noble_input_offsets)
    assert "int32" in nd.noble_group_supported(x, *stacks, m.noble_input_offsets.long())
    assert "shapes" in nd.noble_group_supported(x, *stacks[:-1], stacks[-1][:64], m.noble_input_offsets)
    ys, launches = _grouped(m, torch.randn(2, 20, 32, device=DEV), names, monkeypatch)
    assert launches == 0 and [y.shape for y in ys] == [(2, 20, 48), (2, 20, 16), (2, 20, 32)]
    monkeypatch.setattr(nd, "ROUTE", "never")
    with torch.no_grad():
        assert nd.noble_group_linear(x, *stacks, m.noble_input_offsets, 48) is None
    m.q.weight.requires_grad_(True)
    with torch.enable_grad():
        ys = fi.project_inputs(m, x, names)
    assert ys[0].requires_grad and not ys[1].requires_grad
    norm = torch.nn.LayerNorm(32).to(DEV)
    with torch.no_grad():
        norm.weight.normal_()
        with_norm, launches = _grouped(m, x, names, monkeypatch, norm=norm)
        normed = _each(m, norm(x), names)
    assert launches == 1 and all(torch.equal(a, b) for a, b in zip(with_norm, normed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_prefetched_epilogue_gives_the_same_bits(dtype, monkeypatch):
    """nd.PREFETCH only moves the epilogue's loads before the K loop: the single-layer and grouped kernels
    give the same bits with it on and off (odd K, N not a multiple of the block)."""
    layer = _layer(200, 40).to(DEV, dtype)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    m, names, _ = _attention((48, 16, 32), 40, (True, False, True), dtype)
    xg = torch.randn(2, 40, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    monkeypatch.setattr(nd, "ROUTE", "always")
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(nd, "PREFETCH", on)
        outs[on] = [nd.noble_linear(layer, x), *_grouped(m, xg, names, monkeypatch)[0]]
    assert all(a is not None and torch.equal(a, b) for a, b in zip(outs[False], outs[True]))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_activation_in_the_epilogue_is_the_layer_then_the_eager_activation(activation, dtype, monkeypatch):
    """noble_linear(..., activation=...) is the kernel's output followed by the eager activation (rounded,
    activated in float32, rounded again): float32 within its rounding (Triton's erf and exp are not
    PyTorch's to the bit), bf16 equal on ≥ 95% of elements and within an ulp elsewhere; an unknown
    activation is refused by name."""
    from leanformer.ops.skinny_linear import EAGER_ACTIVATIONS

    layer = _layer(200, 40).to(DEV, dtype)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    monkeypatch.setattr(nd, "ROUTE", "always")
    with torch.no_grad():
        got = nd.noble_linear(layer, x, activation=activation)
        want = EAGER_ACTIVATIONS[activation](nd.noble_linear(layer, x))
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)  # 1 + erf(x) cancels for x < 0
    else:
        assert float((got == want).float().mean()) >= 0.95  # 120 elements: a rounding boundary or two
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-6)
    with pytest.raises(ValueError, match="gelu"):
        nd.noble_linear(layer, x, activation="swish")


def test_mlp_runs_its_noble_layer_and_activation_in_one_launch(monkeypatch):
    """With ACTIVATION_IN_KERNEL, a decoding copy's MLP makes one launch for its first NOBLE layer and GELU
    (the activation code reaches the kernel) and decodes the same tokens and logits as without it."""
    fast, _ = _noble_copy(n_layers=1)
    monkeypatch.setattr(nd, "ROUTE", "always")
    acts = []
    real = nd._noble_op
    monkeypatch.setattr(nd, "_noble_op", lambda *args: acts.append(args[12] if len(args) > 12 else 0)
                        or real(*args))
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1)).to(DEV)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(nd, "ACTIVATION_IN_KERNEL", on)
        acts.clear()
        dec = StaticDecoder(fast, 2, capacity=8, graph="none")
        dec.prefill(prompt)
        dec.step()
        out[on] = (dec.tokens.clone(), dec.logits.clone(), sorted(acts))
    assert out[False][2] == [0] * 6 and out[True][2] == [0, 0, 0, 0, 1, 1]  # o and the second product: 0
    assert torch.equal(out[False][0], out[True][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)  # float32 erf, to rounding


# ---------------------------------------------------------------------------------------------- shared z
@pytest.mark.parametrize("rank", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_shared_z_kernel_equals_the_per_program_kernel(rank, dtype, monkeypatch):
    """With SHARED_Z a layer's z comes from R / 16 producer programs (the first tickets): float32 within 2e-6
    of float64, bf16 equal to the per-program kernel on ≥ 95% of elements and within an ulp of it elsewhere
    (z's sums are split differently), with and without the activation; the counts are zero after each launch."""
    layer = _layer(200, 40, rank=rank)
    layer.register_buffer("decode_sync", torch.zeros(3, dtype=torch.int32), persistent=False)
    layer.register_buffer("decode_offsets", torch.tensor([0, 40], dtype=torch.int32), persistent=False)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(layer).double().forward_reference(x.double())
    layer, xx = layer.to(DEV, dtype), x.to(DEV, dtype)
    monkeypatch.setattr(nd, "ROUTE", "always")
    calls = []
    real = nd._noble_shared_op
    monkeypatch.setattr(nd, "_noble_shared_op", lambda *a: calls.append(1) or real(*a))
    for act in (None, "gelu"):
        with torch.no_grad():
            plain = nd.noble_linear(layer, xx, activation=act)
            monkeypatch.setattr(nd, "SHARED_Z", True)
            shared = nd.noble_linear(layer, xx, activation=act)
            monkeypatch.setattr(nd, "SHARED_Z", False)
        assert layer.decode_sync.tolist() == [0, 0, 0]
        if dtype == torch.float32:
            if act is None:
                assert float((shared.double().cpu() - ref).abs().max() / ref.abs().max()) <= 2e-6
            torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
        else:
            assert float((shared == plain).float().mean()) >= 0.95
            torch.testing.assert_close(shared, plain, rtol=2 ** -7, atol=1e-6)
    assert len(calls) == 2


def test_shared_z_grouped_and_in_a_decoder(monkeypatch):
    """The grouped q, k, v launch and every single layer of a decoding copy take the shared-z kernel: the same
    tokens, logits within float32 rounding, sync counts zero after."""
    fast, _ = _noble_copy(n_layers=2)
    monkeypatch.setattr(nd, "ROUTE", "always")
    calls = []
    real = nd._noble_shared_op
    monkeypatch.setattr(nd, "_noble_shared_op", lambda *a: calls.append(a[12].numel() - 1) or real(*a))  # G
    out = {}
    for on in (False, True):
        monkeypatch.setattr(nd, "SHARED_Z", on)
        calls.clear()
        out[on] = decode_each_route(fast, nd, "_noble_op", monkeypatch, DEV, routes=("always",))["always"]
        out[on] = (*out[on][:2], sorted(calls))
    per_pass = [1, 1, 1, 1, 1, 1, 3, 3]  # per layer: q k v grouped (3), o, the MLP's two
    assert out[False][2] == [] and out[True][2] == sorted(per_pass * 4)  # 2 layers; prefill + 3 steps
    assert torch.equal(out[False][0], out[True][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)
    syncs = [b for n, b in fast.named_buffers() if n.endswith("_sync")]
    assert len(syncs) == 2 * (6 + 1) and all(int(b.abs().sum()) == 0 for b in syncs)


def test_shared_z_buffers_follow_the_weights_device_and_refusals():
    """decoding_copy makes each NOBLE layer's counts and column range on its weights' device (a model on the
    meta device: meta buffers, as a CUDA model gets CUDA ones), and the shared-z path refuses buffers that are
    missing, of another dtype or shape, naming them."""
    cfg = TransformerConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                            noble=NobleConfig(enabled=True, rank=16))
    with torch.device("meta"):
        model = TransformerLM(cfg)
    meta_copy = decoding_copy(model.eval(), torch.float32)
    bufs = {n: b for n, b in meta_copy.named_buffers() if n.endswith(("decode_sync", "decode_offsets"))}
    assert bufs and all(b.is_meta and b.dtype == torch.int32 for b in bufs.values())
    x = torch.zeros(2, 32)
    offsets = torch.tensor([0, 8], dtype=torch.int32)
    assert nd._shared_reason(x, offsets, torch.zeros(3, dtype=torch.int32)) is None
    assert "(3,) int32 sync" in nd._shared_reason(x, offsets, None)
    assert "(3,) int32 sync" in nd._shared_reason(x, offsets, torch.zeros(2, dtype=torch.int32))
    assert "offsets" in nd._shared_reason(x, offsets.long(), torch.zeros(3, dtype=torch.int32))


def test_compiled_step_with_shared_z(monkeypatch):
    """Under torch.compile (aot_eager: the op's in-place sync counts functionalized) the shared-z step decodes
    the eager step's tokens and logits, and the counts stay zero."""
    fast, _ = _noble_copy(n_layers=1)
    monkeypatch.setattr(nd, "ROUTE", "always")
    monkeypatch.setattr(nd, "SHARED_Z", True)
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1)).to(DEV)
    decs = [StaticDecoder(fast, 2, capacity=8, graph="none", compile=c) for c in ("aot_eager", False)]
    for dec in decs:
        dec.prefill(prompt)
        dec.step()
        dec.step()
    assert torch.equal(decs[0].tokens, decs[1].tokens) and torch.equal(decs[0].logits, decs[1].logits)
    assert all(int(b.abs().sum()) == 0 for n, b in fast.named_buffers() if n.endswith("_sync"))


# ---------------------------------------------------------------------------------------------- split K
def _count_launches(monkeypatch):
    """The names of the single-layer ops noble_linear calls from now on (one-launch, or split: partials, finish)."""
    calls = []
    for name in ("_noble_op", "_partials_op", "_finish_op", "_noble_shared_op"):
        real = getattr(nd, name)
        monkeypatch.setattr(nd, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def _both_routes(layer, x, monkeypatch, activation=None):
    """noble_linear's output with SPLIT_K off and on (ROUTE "always")."""
    monkeypatch.setattr(nd, "ROUTE", "always")
    out = []
    for on in (False, True):
        monkeypatch.setattr(nd, "SPLIT_K", on)
        with torch.no_grad():
            out.append(nd.noble_linear(layer, x, activation=activation))
    return out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_split_k_equals_the_one_launch_kernel_and_float64(dtype, bias, monkeypatch):
    """K 2520 (GPT-2's MLP down, 3072, scaled to the interpreter): bf16's 10 tiles of 256 in 4 parts (3, 3, 3, 1
    tiles), float32's 20 of 128 in 7 (the last 2), the last tile partial; N 40 (a partial column block), r 32 (two
    blocks of W_down's rows), M 1, 7, 32. Only the float32 K-sum's association differs from the one-launch
    kernel: float32 within 1e-5 of it, bf16 within an ulp and equal on ≥ 95% of elements; against float64 as
    that kernel is (test_kernel_equals_the_layer_and_float64's bounds)."""
    K, N = 2520, 40
    layer = _layer(K, N, bias=bias, seed=6)
    exact = copy.deepcopy(layer).double().forward_reference
    layer = layer.to(DEV, dtype)
    assert [sl.split_count(rows, N, K, dtype) for rows in (1, 7, 32)] == [4 if dtype == torch.bfloat16 else 7] * 3
    calls = _count_launches(monkeypatch)
    for rows in (1, 7, 32):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
        ref = exact(x.double())
        one, split = _both_routes(layer, x.to(DEV, dtype), monkeypatch)
        assert split.shape == (rows, N) and split.dtype == dtype
        err = float((split.double().cpu() - ref).abs().max() / ref.abs().max())
        if dtype == torch.float32:
            torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
            assert err <= 2e-6, rows
        else:
            torch.testing.assert_close(split, one, rtol=1e-2, atol=1e-2)
            assert float((split == one).float().mean()) >= 0.95, rows
            assert err <= 2 ** -7, rows
    assert calls == ["_noble_op", "_partials_op", "_finish_op"] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_split_k_partials_and_the_activation_in_its_epilogue(dtype, monkeypatch):
    """5 rows, r 16 with BLOCK_N 64 (W_down's rows fill a quarter of their column block): the partials are
    [W; W_down]'s products over the parts of K (their sum within float32 rounding of float64's), and GELU in the
    finishing launch's epilogue is as in the one-launch kernel's."""
    monkeypatch.setattr(sl, "BLOCK_N", 64)
    layer = _layer(1800, 72, rank=16, seed=7).to(DEV, dtype)
    x = torch.randn(5, 1800, generator=torch.Generator().manual_seed(8)).to(DEV, dtype)
    splits = sl.split_count(5, 72, 1800, dtype)
    assert splits == (3 if dtype == torch.bfloat16 else 5)  # 8 tiles of 256 (3, 3, 2); 15 of 128
    parts = nd._partials_op(x, layer.weight, layer.down.weight, splits)
    assert parts.shape == (splits, 5, 72 + 16) and parts.dtype == torch.float32
    want = x.double() @ torch.cat([layer.weight, layer.down.weight]).double().T
    torch.testing.assert_close(parts.double().sum(0), want, rtol=1e-5, atol=1e-5)
    calls = _count_launches(monkeypatch)
    one, split = _both_routes(layer, x, monkeypatch, activation="gelu")
    assert calls == ["_noble_op", "_partials_op", "_finish_op"]
    if dtype == torch.float32:
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(split, one, rtol=1e-2, atol=1e-2)
        assert float((split == one).float().mean()) >= 0.95


def test_split_k_at_gpt2s_mlp_down(monkeypatch):
    """GPT-2's 3072 → 768 (r 32, bf16, 8 rows: 48 column blocks, 12 tiles in 4 parts) by the split route: the
    layer's eager recipe (CosNet in float32) on ≥ 95% of elements, as close to float64 as bf16 allows."""
    K, N = 3072, 768
    layer = _layer(K, N, seed=9)
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(10))
    ref = copy.deepcopy(layer).double().forward_reference(x.double())
    layer, xx = layer.to(DEV, torch.bfloat16), x.to(DEV, torch.bfloat16)
    assert sl.split_count(8, N, K, torch.bfloat16) == 4
    monkeypatch.setattr(nd, "ROUTE", "always")
    monkeypatch.setattr(nd, "SPLIT_K", True)
    calls = _count_launches(monkeypatch)
    with torch.no_grad():
        y = nd.noble_linear(layer, xx)
        recipe = _layer_with_float32_cosnet(layer, xx)
    assert calls == ["_partials_op", "_finish_op"]
    assert float((y == recipe).float().mean()) >= 0.95
    assert float((y.double().cpu() - ref).abs().max() / ref.abs().max()) <= 2 ** -7


def test_split_k_off_or_not_split_changes_nothing(monkeypatch):
    """SPLIT_K is on by default (since its H100 timing); off, a layer that it would split runs the one launch as
    before; on, a layer whose plain product is not split (a short K, or skinny_linear.SPLIT_K None) still does,
    and so do the shared-z and grouped kernels, which it never takes."""
    assert nd.SPLIT_K is True
    monkeypatch.setattr(nd, "SPLIT_K", False)
    monkeypatch.setattr(nd, "ROUTE", "always")
    layer = _layer(1024, 40).to(DEV)  # float32: 8 tiles of 128, 3 parts
    short = _layer(200, 40).to(DEV)
    x = torch.randn(3, 1024, device=DEV)
    assert sl.split_count(3, 40, 1024, torch.float32) == 3 and sl.split_count(3, 40, 200, torch.float32) == 1
    calls = _count_launches(monkeypatch)
    with torch.no_grad():
        before = nd.noble_linear(layer, x)
        assert calls == ["_noble_op"]
        monkeypatch.setattr(nd, "SPLIT_K", True)
        calls.clear()
        nd.noble_linear(short, x[:, :200])
        monkeypatch.setattr(sl, "SPLIT_K", None)
        assert torch.equal(nd.noble_linear(layer, x), before)
        assert calls == ["_noble_op", "_noble_op"]
        monkeypatch.setattr(sl, "SPLIT_K", "auto")
        layer.register_buffer("decode_sync", torch.zeros(3, dtype=torch.int32, device=DEV), persistent=False)
        layer.register_buffer("decode_offsets", torch.tensor([0, 40], dtype=torch.int32, device=DEV),
                              persistent=False)
        monkeypatch.setattr(nd, "SHARED_Z", True)
        calls.clear()
        nd.noble_linear(layer, x)
        assert calls == ["_noble_shared_op"]
    monkeypatch.setattr(nd, "SHARED_Z", False)
    m, names, _ = _attention((16, 32, 16), K=1024)
    assert sl.split_count(3, 64, 1024, torch.float32) > 1
    ys, launches = _grouped(m, x, names, monkeypatch)
    assert launches == 1 and calls == ["_noble_shared_op"]
    monkeypatch.setattr(nd, "SPLIT_K", False)  # each layer's one launch, as the grouped one computes them
    assert all(torch.equal(y, ref) for y, ref in zip(ys, _each(m, x, names)))


def test_split_k_compiles_into_one_graph(monkeypatch):
    """Under torch.compile (AOT autograd, fullgraph: no graph break) both launches are ops of the graph (under the
    interpreter, opaque custom ops; on CUDA, triton_ops traced to their kernels), and the compiled layer gives
    the eager split route's bits."""
    from torch._dynamo.backends.common import aot_autograd

    layer = _layer(1024, 40, seed=11).to(DEV)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(12)).to(DEV)
    monkeypatch.setattr(nd, "ROUTE", "always")
    monkeypatch.setattr(nd, "SPLIT_K", True)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        eager = nd.noble_linear(layer, x, activation="gelu")
        compiled = torch.compile(lambda t: nd.noble_linear(layer, t, activation="gelu"),
                                 backend=aot_autograd(fw_compiler=record), fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    if DEV.type == "cpu":
        assert [t for t in targets if t.startswith("leanformer.")] == ["leanformer.noble_decode_partials.default",
                                                                      "leanformer.noble_decode_finish.default"]


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_z_apart_sends_every_single_layer_through_the_two_launches(activation, monkeypatch):
    """Z_APART: a layer whose plain product is not split (K 200) also runs as partials (one part) and the finishing
    launch, with the one-launch kernel's result (float32: the same K-sum order within one part, so within 1e-6),
    the activation in the finishing launch's epilogue; off (the default), the one launch."""
    assert nd.Z_APART is False
    monkeypatch.setattr(nd, "ROUTE", "always")
    layer = _layer(200, 40).to(DEV)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(11)).to(DEV)
    assert sl.split_count(3, 40, 200, torch.float32) == 1
    calls = _count_launches(monkeypatch)
    with torch.no_grad():
        one = nd.noble_linear(layer, x, activation=activation)
        monkeypatch.setattr(nd, "Z_APART", True)
        apart = nd.noble_linear(layer, x, activation=activation)
    assert calls == ["_noble_op", "_partials_op", "_finish_op"]
    torch.testing.assert_close(apart, one, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("route", ["one-launch", "two-launch"])
def test_cosnet_precision_switch(route, monkeypatch):
    """COSNET_PRECISION "tf32": the epilogue's r × r product on tensor cores, the output within 5e-3 of float64's
    (on the GPU; the interpreter's products are float32 either way, so there it equals "ieee"); another value is
    named."""
    monkeypatch.setattr(nd, "ROUTE", "always")
    monkeypatch.setattr(nd, "Z_APART", route == "two-launch")
    layer = _layer(200, 40).to(DEV)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(12))
    ref = copy.deepcopy(layer).double().cpu().forward_reference(x.double())
    x = x.to(DEV)
    with torch.no_grad():
        ieee = nd.noble_linear(layer, x)
        monkeypatch.setattr(nd, "COSNET_PRECISION", "tf32")
        tf32 = nd.noble_linear(layer, x)
        assert float((tf32.double().cpu() - ref).abs().max() / ref.abs().max()) <= 5e-3
        if DEV.type == "cpu":
            assert torch.equal(tf32, ieee)
        monkeypatch.setattr(nd, "COSNET_PRECISION", "fp8")
        with pytest.raises(ValueError, match=r"COSNET_PRECISION='fp8' must be one of \('ieee', 'tf32'\)"):
            nd.noble_linear(layer, x)
