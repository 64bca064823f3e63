"""NOBLE (issue 3): NobleLinear, CosNet, injection into any model, layer selection."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from leanformer.inject import (
    apply_noble,
    importance_scores,
    remove_noble,
    select_by_importance,
)
from leanformer.layers.noble import CosNet, NobleLinear


def _grads(module: nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = forward(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    grads["input"] = x.grad.clone()
    return y.detach(), grads


# ------------------------------------------------------------------ fused vs reference
@pytest.mark.parametrize("activation", ["cosnet", "silu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fusion", ["add", "gate"])
def test_fused_equals_reference_float64(activation, bias, fusion):
    torch.manual_seed(0)
    layer = NobleLinear(24, 40, bias=bias, rank=6, activation=activation, fusion=fusion,
                        alpha=1.5 if fusion == "gate" else 1.0, dtype=torch.float64)
    with torch.no_grad():  # make the branch matter
        layer.up.weight.normal_()
        if layer.gate is not None:
            layer.gate.fill_(0.3)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    assert layer.fused
    y_fused, g_fused = _grads(layer, x, layer.forward)
    y_ref, g_ref = _grads(layer, x, layer.forward_reference)
    assert y_fused.shape == (3, 5, 40)
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-12, atol=1e-12)
    assert g_fused.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)


def test_reference_is_the_equation():
    """forward_reference = x Wᵀ + b + W_up σ(W_down x + b_down), σ = CosNet, written out by hand."""
    torch.manual_seed(1)
    layer = NobleLinear(8, 5, rank=3, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    a = layer.act
    z = x @ layer.down.weight.T + layer.down.bias
    s = torch.cos(a.omega2 * (torch.cos(a.omega1 * z + a.phi1) @ a.M.weight.T + a.M.bias) + a.phi2)
    expected = x @ layer.weight.T + layer.bias + s @ layer.up.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_reference(x), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_small():
    torch.manual_seed(2)
    layer = NobleLinear(4, 3, rank=2, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# ------------------------------------------------------------------ CosNet and init
def test_cosnet_range():
    torch.manual_seed(3)
    act = CosNet(16)
    with torch.no_grad():
        act.M.weight.mul_(50)
    z = torch.randn(1000, 16) * 100
    y = act(z)
    assert y.shape == z.shape
    assert y.min() >= -1 and y.max() <= 1
    assert y.std() > 0.1  # not degenerate


def test_init_statistics():
    torch.manual_seed(4)
    d_in, d_out, r = 512, 384, 64
    layer = NobleLinear(d_in, d_out, rank=r)

    def check(t: torch.Tensor, std: float, name: str) -> None:
        assert abs(t.mean().item()) < 4 * std / math.sqrt(t.numel()), name
        assert abs(t.std().item() / std - 1) < 0.05, (name, t.std().item(), std)

    check(layer.weight, 0.5 / math.sqrt(d_in), "W")
    check(layer.down.weight, 1.0 / math.sqrt(d_in), "W_down")
    check(layer.up.weight, 0.01 / math.sqrt(r), "W_up")
    check(layer.act.M.weight, 0.5 / math.sqrt(r), "M")
    assert torch.all(layer.bias == 0) and torch.all(layer.down.bias == 0)
    assert layer.up.bias is None

    acts = [CosNet(128) for _ in range(100)]  # ω, φ are length-r vectors: pool many for statistics
    omegas = [torch.cat([getattr(a, n).detach() for a in acts]) for n in ("omega1", "omega2")]
    phis = [torch.cat([getattr(a, n).detach() for a in acts]) for n in ("phi1", "phi2")]
    for omega in omegas:
        assert omega.min() >= 0.8 and omega.max() <= 1.2
        assert abs(omega.mean().item() - 1.0) < 0.005
        assert abs(omega.std().item() - 0.4 / math.sqrt(12)) < 0.005  # U[0.8, 1.2]
    for phi in phis:
        assert abs(phi.mean().item()) < 0.005
        assert abs(phi.std().item() - 0.1) < 0.005


def test_rank_ratio():
    assert NobleLinear(16, 64, rank_ratio=0.25).rank == 16
    assert NobleLinear(16, 3, rank_ratio=0.01).rank == 1
    assert NobleLinear(16, 64, rank=5).rank == 5


# ------------------------------------------------------------------ lr_mult / decay
def _expected_mults(d_in: int, d_out: int, r: int) -> dict[str, float]:
    ratio = min(d_in, d_out) / r
    return {"down.weight": 1.0, "down.bias": 1.0, "up.weight": ratio ** 0.4, "act.M.weight": ratio ** 0.5,
            "act.M.bias": 1.0, "act.omega1": 2.0, "act.omega2": 2.0, "act.phi1": 4.0, "act.phi2": 4.0}


def _tags(module: nn.Module) -> dict[str, tuple[float, bool]]:
    from leanformer.train.optim import param_tags

    return param_tags(module)


def test_lr_mult_on_each_parameter():
    layer = NobleLinear(96, 64, rank=16)
    got = {n: mult for n, (mult, _) in _tags(layer).items()}
    expected = _expected_mults(96, 64, 16)
    assert got["act.M.weight"] == pytest.approx(2.0)  # (64/16)^0.5: the multiplier the official code loses
    for name, mult in expected.items():
        assert got[name] == pytest.approx(mult), name
    assert got["weight"] == 1.0 and got["bias"] == 1.0  # main path: trainer default 1
    no_decay = {n for n, (_, decays) in _tags(layer).items() if not decays}
    assert no_decay == {"bias", "down.bias", "act.M.bias", "act.omega1", "act.omega2", "act.phi1", "act.phi2"}


def test_lr_mult_survives_copies_and_loading():
    layer = NobleLinear(32, 48, rank=8)
    want = _tags(layer)
    assert _tags(copy.deepcopy(layer)) == want
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert _tags(torch.load(buf, weights_only=False)) == want
    other = NobleLinear(32, 48, rank=8)
    other.load_state_dict(copy.deepcopy(layer).state_dict(), assign=True)
    assert _tags(other) == want
    assert _tags(layer.to(torch.float64)) == want


def test_lr_mult_reaches_optimizer_groups():
    optim = pytest.importorskip("leanformer.train.optim")
    from leanformer.config import TrainConfig

    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 12))
    apply_noble(model, rank=4, preserve_output=False)
    opt = optim.build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, NobleLinear):
            continue
        expected = _expected_mults(layer.in_features, layer.out_features, layer.rank)
        params = dict(layer.named_parameters())
        for pname, mult in expected.items():
            group = group_of[id(params[pname])]
            assert group["lr_mult"] == pytest.approx(mult), f"{name}.{pname}"
            decays = params[pname].ndim >= 2
            assert group["weight_decay"] == (0.1 if decays else 0.0), f"{name}.{pname}"
            checked += 1
    assert checked == 2 * 9
    optim.set_lr(opt, 1e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])


# ------------------------------------------------------------------ gate variant
def test_gate_variant():
    torch.manual_seed(5)
    layer = NobleLinear(10, 7, rank=3, activation="silu", fusion="gate", alpha=2.0, dropout=0.1)
    assert layer.gate.shape == () and layer.gate.item() == 0.0
    x = torch.randn(4, 10)
    layer.eval()
    main = nn.functional.linear(x, layer.weight, layer.bias)
    branch = layer.up(nn.functional.silu(layer.down(x)))
    torch.testing.assert_close(layer(x), 2.0 * (0.5 * main + 0.5 * branch))
    layer.train()
    y = layer(x)
    assert y.shape == (4, 7)
    y.square().sum().backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs() > 0
    assert layer.up.weight.grad.abs().sum() > 0
    assert _tags(layer)["gate"] == (1.0, False)


# ------------------------------------------------------------------ injection
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(16, 24), "out": nn.Linear(24, 16, bias=False)})
            for _ in range(2))
        self.lm_head = nn.Linear(16, 30)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for b in self.blocks:
            x = x + b["out"](torch.tanh(b["proj"](x)))
        return self.lm_head(x)


def test_preserve_output_and_remove_toy():
    torch.manual_seed(6)
    model = Toy()
    idx = torch.randint(0, 30, (2, 9))
    ref = model(idx)
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    types = [(n, type(m)) for n, m in model.named_modules()]
    out = apply_noble(model, rank=4)
    assert out is model
    replaced = model.noble_injection["replaced"]
    assert replaced == ["blocks.0.out", "blocks.0.proj", "blocks.1.out", "blocks.1.proj"]
    assert model.noble_injection["skipped_heads"] == ["lm_head"]
    assert type(model.lm_head) is nn.Linear
    assert model.blocks[0]["proj"].weight is originals["blocks.0.proj"]  # kept, not copied
    assert torch.equal(model(idx), ref)
    assert sum(isinstance(m, NobleLinear) for m in model.modules()) == 4
    remove_noble(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert torch.equal(model(idx), ref)
    assert not hasattr(model, "noble_injection")


def test_patterns_exclude_layers():
    model = Toy()
    apply_noble(model, target_modules=["proj"], rank=2)
    assert model.noble_injection["replaced"] == ["blocks.0.proj", "blocks.1.proj"]
    model = Toy()
    apply_noble(model, target_modules=r"blocks\.\d+\.(proj|out)", exclude_modules=["blocks.1.out"], rank=2)
    assert model.noble_injection["replaced"] == ["blocks.0.out", "blocks.0.proj", "blocks.1.proj"]
    model = Toy()
    apply_noble(model, layers=[1], rank=2)
    assert model.noble_injection["replaced"] == ["blocks.1.out", "blocks.1.proj"]


def test_tied_head_is_never_converted():
    model = Toy()
    model.out_proj = model.lm_head  # another name for the head
    model.lm_head.weight = model.embed.weight
    apply_noble(model, rank=2)
    assert type(model.lm_head) is nn.Linear
    assert all("lm_head" not in n and "out_proj" not in n for n in model.noble_injection["replaced"])
    with torch.device("meta"):  # meta tensors share data_ptr 0: ties must not be guessed from it
        model = Toy()
    apply_noble(model, rank=2)
    assert len(model.noble_injection["replaced"]) == 4


def test_errors():
    with pytest.raises(ValueError, match="no linear module matched target_modules=\\['nonexistent'\\]"):
        apply_noble(Toy(), target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="only LM heads matched"):
        apply_noble(Toy(), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        NobleLinear(8, 8, rank=0)
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        apply_noble(Toy(), rank=0)
    with pytest.raises(ValueError, match="activation='relu6' is not valid; choose one of cosnet, silu"):
        NobleLinear(8, 8, activation="relu6")
    with pytest.raises(ValueError, match="fusion='mul' is not valid"):
        NobleLinear(8, 8, fusion="mul")
    with pytest.raises(ValueError, match="alpha=2.0 only applies to fusion='gate'"):
        NobleLinear(8, 8, alpha=2.0)
    with pytest.raises(ValueError, match="preserve_output=True cannot hold with fusion='gate'"):
        NobleLinear.from_linear(nn.Linear(8, 8), fusion="gate")
    with pytest.raises(TypeError, match="got Conv2d"):
        NobleLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="percentile=120 must be in"):
        select_by_importance({"a": 1.0}, 120)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(7)
    model = apply_noble(Toy(), rank=4, preserve_output=False)  # live branches
    idx = torch.randint(0, 30, (2, 9))
    ref = model(idx)
    save_file(model.state_dict(), str(tmp_path / "noble.safetensors"))
    torch.manual_seed(8)
    fresh = apply_noble(Toy(), rank=4, preserve_output=False)
    assert not torch.equal(fresh(idx), ref)
    fresh.load_state_dict(load_file(str(tmp_path / "noble.safetensors")), strict=True)
    assert torch.equal(fresh(idx), ref)
    assert _tags(fresh.blocks[0]["proj"]) == _tags(model.blocks[0]["proj"])


# ------------------------------------------------------------------ Hugging Face
def test_gpt2_conv1d_preserve_remove(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_model, save_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(9)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    idx = torch.randint(0, 100, (2, 12))
    ref = model(idx).logits
    conv = model.transformer.h[0].attn.c_attn
    w_conv, b_conv = conv.weight.detach().clone(), conv.bias
    types = [(n, type(m)) for n, m in model.named_modules()]
    apply_noble(model, rank=8)
    assert len(model.noble_injection["replaced"]) == 8
    assert model.noble_injection["skipped_heads"] == ["lm_head"]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, NobleLinear) and (layer.in_features, layer.out_features) == (64, 192)
    assert torch.equal(layer.weight, w_conv.T) and layer.bias is b_conv
    torch.testing.assert_close(model(idx).logits, ref, rtol=0, atol=1e-6)
    # tied embeddings: save_model/load_model deduplicate shared tensors
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NobleLinear):
                m.up.weight.normal_(0, 0.01)
    live = model(idx).logits
    save_model(model, str(tmp_path / "gpt2.safetensors"))
    fresh = apply_noble(transformers.GPT2LMHeadModel(cfg).eval(), rank=8)
    load_model(fresh, str(tmp_path / "gpt2.safetensors"))
    assert torch.equal(fresh(idx).logits, live)
    # remove on a preserved conversion: identical module types and outputs
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ref = model(idx).logits
    remove_noble(apply_noble(model, rank=8))
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert isinstance(model.transformer.h[1].mlp.c_fc, Conv1D)
    assert torch.equal(model(idx).logits, ref)


def test_llama_preserve_remove():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    idx = torch.randint(0, 100, (2, 12))
    ref = model(idx).logits
    types = [(n, type(m)) for n, m in model.named_modules()]
    apply_noble(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                exclude_modules=[r".*layers\.1\.self_attn\.k_proj"], rank=8)
    assert len(model.noble_injection["replaced"]) == 11
    assert not isinstance(model.model.layers[1].self_attn.k_proj, NobleLinear)
    assert not isinstance(model.model.layers[0].mlp.gate_proj, NobleLinear)
    assert torch.equal(model(idx).logits, ref)
    out = model(idx, labels=idx)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.up.weight.grad.abs().sum() > 0  # the branch learns
    remove_noble(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert torch.equal(model(idx).logits, ref)


# ------------------------------------------------------------------ selection
class Dead(nn.Module):
    """out = Σ_i c_i lin_i(x), c = (0,)*7 + (1, 2, 3): only the last three linears affect the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(6, 6) for _ in range(10))
        self.register_buffer("c", torch.tensor([0.0] * 7 + [1.0, 2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c * lin(x) for c, lin in zip(self.c, self.lins))


def test_importance_selects_the_layers_that_matter():
    torch.manual_seed(11)
    model = Dead()
    batches = [torch.randn(8, 6) for _ in range(3)]
    loss_fn = lambda m, x: m(x).square().mean()  # noqa: E731
    model.lins[0].weight.requires_grad_(False)
    scores = importance_scores(model, batches, loss_fn)
    assert set(scores) == {f"lins.{i}" for i in range(10)}
    assert all(scores[f"lins.{i}"] == 0 for i in range(7))
    assert all(scores[f"lins.{i}"] > 0 for i in range(7, 10))
    assert all(p.grad is None for p in model.parameters())  # no side effects
    assert not model.lins[0].weight.requires_grad and model.training
    assert sorted(select_by_importance(scores)) == ["lins.7", "lins.8", "lins.9"]  # 70th percentile
    # the score is Σ_batches Σ|W ⊙ ∂L/∂W|: check one layer by hand
    w = model.lins[9].weight
    manual = sum((w * torch.autograd.grad(loss_fn(model, x), w)[0]).abs().sum().item() for x in batches)
    assert scores["lins.9"] == pytest.approx(manual, rel=1e-6)
    apply_noble(model, importance=scores, percentile=70, rank=2)
    assert model.noble_injection["replaced"] == ["lins.7", "lins.8", "lins.9"]


def test_select_by_importance_percentile():
    scores = {f"l{i}": float(i) for i in range(1, 11)}
    assert sorted(select_by_importance(scores, 70)) == ["l10", "l8", "l9"]
    assert len(select_by_importance(scores, 0)) == 10
    assert select_by_importance(scores, 100) == ["l10"]


# ------------------------------------------------------------------ our LM
def _lm_config(**noble):
    from leanformer.config import NobleConfig, TransformerConfig

    return TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                             noble=NobleConfig(**noble))


def test_transformer_lm_noble_config():
    model_mod = pytest.importorskip("leanformer.model")
    torch.manual_seed(12)
    model = model_mod.TransformerLM(_lm_config(enabled=True, rank=4))
    nobles = {n for n, m in model.named_modules() if isinstance(m, NobleLinear)}
    roles = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.ffn_in", "mlp.ffn_out")
    assert nobles == {f"blocks.{i}.{r}" for i in range(2) for r in roles}
    assert type(model.lm_head) is nn.Linear
    layer = model.blocks[0].attn.q
    assert layer.up.weight.std().item() == pytest.approx(0.01 / math.sqrt(4), rel=0.3)  # paper init kept
    branch = sum(model.get_submodule(n).extra_params() for n in nobles)
    assert model.summary()["noble_branch_params"] == branch
    idx = torch.randint(0, 64, (2, 10))
    logits, loss = model(idx, targets=idx)
    loss.backward()
    assert layer.act.M.weight.grad is not None


def test_apply_noble_on_our_lm_preserves_output():
    model_mod = pytest.importorskip("leanformer.model")
    torch.manual_seed(13)
    model = model_mod.TransformerLM(_lm_config()).eval()
    idx = torch.randint(0, 64, (2, 10))
    ref, _ = model(idx)
    apply_noble(model, rank=4)
    assert type(model.lm_head) is nn.Linear and "lm_head" in model.noble_injection["skipped_heads"]
    assert len(model.noble_injection["replaced"]) == 12
    assert torch.equal(model(idx)[0], ref)
    remove_noble(model)
    assert torch.equal(model(idx)[0], ref)


def test_main_init_model_keeps_the_lm_init_and_lr_mults_can_be_switched_off():
    from leanformer import TransformerConfig, TransformerLM
    from leanformer.config import NobleConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=128, n_layers=4, noble=NobleConfig(enabled=True, main_init="model", lr_mults=False))
    model = TransformerLM(cfg)
    q, o = model.blocks[0].attn.q, model.blocks[0].attn.o
    assert abs(q.weight.std().item() - 0.02) < 0.002  # GPT-2 init, not N(0, 0.5/sqrt(128)) = 0.044
    assert abs(o.weight.std().item() - 0.02 / 8 ** 0.5) < 0.001  # residual output scaled by 1/sqrt(2L)
    assert all(mult == 1.0 for mult, _ in _tags(model).values())
    paper = TransformerLM(TransformerConfig(d_model=128, n_layers=4, noble=NobleConfig(enabled=True)))
    assert abs(paper.blocks[0].attn.q.weight.std().item() - 0.5 / 128 ** 0.5) < 0.004


# ---------------------------------------------------------------------------------------------- one stored matrix


def _shares_buffer(layer: NobleLinear) -> bool:
    """The main and down weights share one buffer, and so do the two biases when the layer has a main bias."""
    from leanformer.layers.noble import _adjacent

    biases = layer.bias is None or _adjacent(layer.bias, layer.down.bias)
    return _adjacent(layer.weight, layer.down.weight) and biases


def test_main_and_down_weights_are_one_buffer_through_moves_loads_and_from_linear():
    layer = NobleLinear(12, 10, rank=3)
    assert _shares_buffer(layer)
    layer = layer.double()  # .to() moves each parameter on its own: restacked after
    assert _shares_buffer(layer) and layer.weight.dtype == torch.float64
    other = NobleLinear(12, 10, rank=3).double()
    other.load_state_dict(layer.state_dict())
    assert _shares_buffer(other) and torch.equal(other.weight, layer.weight)
    other.load_state_dict(layer.state_dict(), assign=True)  # new Parameter objects: restacked by the hook
    assert _shares_buffer(other)
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    noble = NobleLinear.from_linear(lin, rank=3)
    assert noble.weight is lin.weight and torch.equal(noble.weight, w0) and _shares_buffer(noble)
    sd = noble.state_dict()  # the checkpoint keys are unchanged, and each entry owns its storage
    assert {"weight", "down.weight"} <= set(sd)
    assert sd["weight"].untyped_storage().data_ptr() != sd["down.weight"].untyped_storage().data_ptr()
    assert sd["weight"].shape == (10, 12) and sd["down.weight"].shape == (3, 12)
    assert sd["bias"].untyped_storage().data_ptr() != sd["down.bias"].untyped_storage().data_ptr()
    assert noble.bias is lin.bias and sd["bias"].shape == (10,) and sd["down.bias"].shape == (3,)


def test_stacked_view_and_addmm_match_float64_reference_with_gradients():
    torch.manual_seed(0)
    layer = NobleLinear(16, 24, rank=4, bias=True).double()
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.3)
    assert _shares_buffer(layer)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 24, dtype=torch.float64)
    names = ["weight", "down.weight", "up.weight", "act.M.weight", "bias", "down.bias"]
    params = dict(layer.named_parameters())

    def grads(fn):
        out = fn(x)
        got = torch.autograd.grad(out, [x] + [params[n] for n in names], g)
        return out, got

    fast_out, fast = grads(layer.forward)
    ref_out, ref = grads(layer.forward_reference)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["x"] + names, fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    # optimizer-visible gradients land on the two ordinary parameters
    layer.zero_grad()
    layer(x).backward(g)
    assert layer.weight.grad.shape == (24, 16) and layer.down.weight.grad.shape == (4, 16)
    torch.testing.assert_close(layer.down.weight.grad, ref[2])


def test_fused_falls_back_to_concatenation_when_weights_do_not_share_a_buffer():
    torch.manual_seed(1)
    layer = NobleLinear(8, 8, rank=2).double()
    layer.down.weight = nn.Parameter(layer.down.weight.detach().clone())  # a separate tensor
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.forward_reference(x))


@pytest.mark.parametrize("activation", ["cosnet", "silu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_kcat_form_matches_float64_reference_with_gradients(activation, bias):
    """[x, σ(z)] [W, W_up]ᵀ + b is the same function and gradients as the two-product reference."""
    torch.manual_seed(2)
    layer = NobleLinear(24, 40, bias=bias, rank=6, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        layer.up.weight.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    y_k, g_k = _grads(layer, x, layer.forward_kcat)
    y_ref, g_ref = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(y_k, y_ref, rtol=1e-12, atol=1e-12)
    assert g_k.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_k[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)


def test_kcat_form_refuses_gate_and_dropout():
    for kw in ({"fusion": "gate"}, {"dropout": 0.1}):
        layer = NobleLinear(8, 8, rank=2, **kw)
        with pytest.raises(ValueError, match="plain sum"):
            layer.forward_kcat(torch.randn(2, 8))


@pytest.mark.parametrize("form", ["stacked", "kcat"])
def test_compiled_forms_match_float64_reference(form, monkeypatch):
    """Under torch.compile the layer takes its compiled_form (traced with aot_eager on the CPU)."""
    taken = []
    kcat = NobleLinear.forward_kcat

    def counted(self, x):
        taken.append("kcat")
        return kcat(self, x)
    monkeypatch.setattr(NobleLinear, "forward_kcat", counted)
    torch.manual_seed(3)
    layer = NobleLinear(16, 24, rank=4, compiled_form=form, dtype=torch.float64)
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c, g_c = _grads(layer, x, compiled)
    y_ref, g_ref = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(y_c, y_ref, rtol=1e-12, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g_c[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)
    assert bool(taken) == (form == "kcat")
    taken.clear()
    layer(x)  # eager ignores the compiled form
    assert not taken
    torch._dynamo.reset()


def test_compiled_form_is_validated_and_reaches_the_model():
    from leanformer.config import ConfigError, TransformerConfig
    from leanformer.model import TransformerLM

    with pytest.raises(ValueError, match="compiled_form='rows'"):
        NobleLinear(8, 8, compiled_form="rows")
    cfg = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    cfg.noble.enabled, cfg.noble.compiled_form = True, "kcat"
    model = TransformerLM(cfg.validate())
    forms = {m.compiled_form for m in model.modules() if isinstance(m, NobleLinear)}
    assert forms == {"kcat"}
    cfg.noble.compiled_form = "rows"
    with pytest.raises(ConfigError, match="noble.compiled_form"):
        cfg.validate()
    cfg.noble.compiled_form, cfg.noble.fusion = "kcat", "gate"
    with pytest.raises(ConfigError, match="kcat computes the fused plain sum"):
        cfg.validate()


def _saved_activation_bytes(layer: NobleLinear, x: torch.Tensor, forward) -> list[int]:
    """Bytes of each storage autograd keeps for the backward pass of ``forward(x)``, parameters and x excluded."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes() > 0:
            saved[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x).sum().backward()
    return list(saved.values())


@pytest.mark.parametrize("compiled", [False, True])
def test_training_keeps_only_rank_wide_branch_activations(compiled):
    """The fused layer splits one product into (main, z); what its backward keeps must be rank-wide (z and
    CosNet's intermediates), never the main output, which a saved view of z would keep alive."""
    torch.manual_seed(0)
    n, d_in, d_out, r = 512, 16, 64, 4
    layer = NobleLinear(d_in, d_out, rank=r)
    x = torch.randn(n, d_in)
    forward = layer
    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(layer, backend="aot_eager", fullgraph=True)
    sizes = _saved_activation_bytes(layer, x, forward)
    main_bytes = n * d_out * 4
    assert max(sizes) < main_bytes, sizes
    assert sum(sizes) <= 8 * n * r * 4, sizes  # a few (n, r) tensors: z and CosNet's chain
    torch._dynamo.reset()
