"""NOBLE: a linear layer plus a nonlinear low-rank branch (Smith 2026, arXiv 2603.06492).

    y = x Wᵀ + b + W_up σ(W_down x + b_down)                                   (paper, Eq. 1)

with σ = CosNet by default:

    σ(z) = cos(ω₂ ⊙ (M cos(ω₁ ⊙ z + φ₁) + c) + φ₂)                            (paper, CosNet)

Shapes: x ``(..., d_in)``, W ``(d_out, d_in)``, W_down ``(r, d_in)``, M ``(r, r)``, W_up ``(d_out, r)``,
y ``(..., d_out)``. The branch is nonlinear, so it cannot be merged into W.

Learning-rate multipliers are declared by :meth:`NobleLinear.optim_settings` and read by
:func:`leanformer.train.optim.param_tags` (0-/1-d parameters get no weight decay by the trainer's default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.ops.on_cuda import kernel_switch_allows

ACTIVATIONS = ("cosnet", "silu", "gelu", "tanh")
FUSIONS = ("add", "gate")
# How a fused layer (fusion "add", no dropout) computes under torch.compile (NobleLinear's compiled_form):
#   "stacked": one product with [W; W_down] (rows), then main + σ(z) W_upᵀ (a rank-r product and a sum);
#   "kcat": z = x W_downᵀ first, then one product [x, σ(z)] [W, W_up]ᵀ (W_up joins along the inner axis), so
#   the branch's up-projection, its two backward products against dy and the [dy, dz] concatenation are
#   gone, for a copy of x into [x, σ(z)] and two rank-r products against x. Measured (docs/benchmarks.md,
#   2026-12-05): kcat 5.7% faster per GPT-2 step under CUDA graphs, 20.5% slower in the default mode; its
#   backward keeps each [x, σ(z)] (a copy of the input per linear): 1.36× Pre-LN's saved activations against
#   stacked's 1.05× (benchmarks/saved_memory.py, CPU, 2026-12-06).
COMPILED_FORMS = ("stacked", "kcat")
# CosNet through leanformer.ops.cosnet's Triton kernels (one pass over z forward, one backward): "cuda" on
# CUDA tensors the kernels take, "always" also on the CPU under TRITON_INTERPRET=1 (tests), "never" (the
# PyTorch form; the default until the kernels are timed on a GPU)
COSNET_KERNEL = "never"
# A plain-sum CosNet layer's forward and backward through leanformer.ops.noble_train (the branch's up product
# inside the main product's inner axis, dz W_down inside dx's product, CosNet by its kernels): "cuda" on CUDA
# tensors the kernels take (the default since timed: GPT-2 b16 under CUDA graphs, H100, 2026-12-07 22:18, callAF:
# 51.36 ms per step with noble_train.BRANCH "separate" against 54.75 for the stacked form, 0.938x, peak memory 8.59
# against 8.62 GiB), "always" also on the CPU under TRITON_INTERPRET=1 (tests), "never" (the stacked or kcat form).
# Only with autograd on: a pass without it (evaluation, decoding) keeps the stacked form's cuBLAS products
TRAIN_KERNEL = "cuda"


def use_cosnet_kernel(z: torch.Tensor) -> bool:
    """Whether :class:`CosNet` runs z (..., r) through :func:`leanformer.ops.cosnet.cosnet`."""
    if not kernel_switch_allows("COSNET_KERNEL", COSNET_KERNEL, z):
        return False
    from leanformer.ops.cosnet import cosnet_supported

    return cosnet_supported(z) is None


class BranchLinear(nn.Module):
    """A bare ``x -> x Wᵀ (+ b)`` holding ``weight (out, in)`` and ``bias (out,)``.

    Deliberately not an ``nn.Linear`` subclass: model-wide initialisers (ours, Hugging Face's
    ``_init_weights``) and "all-linear" injection match ``nn.Linear`` and must not touch the branch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class CosNet(nn.Module):
    """``cos(ω₂ ⊙ (M cos(ω₁ ⊙ z + φ₁) + c) + φ₂)`` over the last axis of ``z (..., r)``; output in [-1, 1].

    Paper init: ω ~ U[0.8, 1.2], φ ~ N(0, 0.1), M ~ N(0, 0.5/√r); c keeps PyTorch's default
    U(-1/√r, 1/√r) as in the official code. Parameters: ``omega1, phi1, M.weight, M.bias, omega2, phi2``.
    """

    def __init__(self, rank: int, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"CosNet rank={rank} must be >= 1")
        kw = {"device": device, "dtype": dtype}
        self.rank = rank
        self.omega1 = nn.Parameter(torch.empty(rank, **kw))
        self.phi1 = nn.Parameter(torch.empty(rank, **kw))
        self.M = BranchLinear(rank, rank, bias=True, **kw)
        self.omega2 = nn.Parameter(torch.empty(rank, **kw))
        self.phi2 = nn.Parameter(torch.empty(rank, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r = self.rank
        for omega in (self.omega1, self.omega2):
            omega.uniform_(0.8, 1.2)
        for phi in (self.phi1, self.phi2):
            phi.normal_(0.0, 0.1)
        self.M.weight.normal_(0.0, 0.5 / math.sqrt(r))
        self.M.bias.uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if use_cosnet_kernel(z):  # same function, one Triton pass each way (see COSNET_KERNEL)
            from leanformer.ops.cosnet import cosnet

            return cosnet(z, self.omega1, self.phi1, self.M.weight, self.M.bias, self.omega2, self.phi2)
        h = torch.cos(self.omega1 * z + self.phi1)
        return torch.cos(self.omega2 * self.M(h) + self.phi2)


def make_activation(name: str, rank: int, device: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The branch nonlinearity σ: ``cosnet`` (paper), ``silu``, ``gelu`` or ``tanh``."""
    if name == "cosnet":
        return CosNet(rank, device=device, dtype=dtype)
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"NOBLE activation={name!r} is not valid; choose one of {', '.join(ACTIVATIONS)}")


class _StackedRows(torch.autograd.Function):
    """``[W; W_down]`` (d_out + r, d_in), or ``[b; b_down]`` (d_out + r,), as a view of the one buffer both
    parameters live in (no copy).

    Forward returns the buffer's rows; backward hands each parameter its rows of the gradient (views).
    Only valid when :func:`_adjacent` holds; :meth:`NobleLinear.stacked_weight` falls back to ``torch.cat``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, down: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.rows = weight.shape[0]
        return weight.as_strided((weight.shape[0] + down.shape[0], *weight.shape[1:]), weight.stride())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        return grad[: ctx.rows], grad[ctx.rows:]


def _adjacent(weight: torch.Tensor, down: torch.Tensor) -> bool:
    """True when ``down`` continues ``weight`` row for row in one storage (plain contiguous tensors)."""
    return (type(weight) in (torch.Tensor, nn.Parameter) and type(down) in (torch.Tensor, nn.Parameter)
            and weight.device.type != "meta" and weight.is_contiguous() and down.is_contiguous()
            and weight.dtype == down.dtype and weight.device == down.device
            and weight.untyped_storage().data_ptr() == down.untyped_storage().data_ptr()
            and down.storage_offset() == weight.storage_offset() + weight.numel())


def _restack_after_load(module: NobleLinear, _keys) -> None:  # noqa: ANN001
    module.restack()


def _unshare_in_state_dict(module: NobleLinear, state_dict: dict, prefix: str, _meta) -> None:  # noqa: ANN001
    """``weight`` and ``down.weight`` leave as tensors of their own (safetensors refuses views of one
    buffer); with ``keep_vars=True`` the parameters themselves stay."""
    for key in (prefix + "weight", prefix + "down.weight", prefix + "bias", prefix + "down.bias"):
        t = state_dict.get(key)
        if t is not None and not isinstance(t, nn.Parameter) and t.device.type != "meta":
            state_dict[key] = t.clone()


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: ``y = x W + b`` with ``weight (in, out)``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


class NobleLinear(nn.Module):
    """``y = x Wᵀ + b + W_up σ(W_down x + b_down)``: a drop-in for ``nn.Linear`` (paper Eq. 1).

    Args:
        in_features, out_features, bias: as ``nn.Linear``; ``weight``/``bias`` keep its state-dict names.
        rank: r, the branch width (paper default 32). ``rank_ratio`` overrides it:
            ``r = max(1, round(out_features * rank_ratio))`` (``d_out // 4`` is 0.25).
        activation: σ, one of ``cosnet`` (paper), ``silu``, ``gelu``, ``tanh``.
        fusion: ``add`` (paper: plain sum) or ``gate`` (docs/methods.md, section 1:
            ``y = α (sigmoid(w) main + (1 − sigmoid(w)) branch)``, w a learned scalar, init 0).
        dropout: on the branch output (both fusions).
        alpha: α, the gate variant's output scale; ``fusion="add"`` has none and needs ``alpha=1``.
        fused: compute ``x [W; W_down]ᵀ`` as one matrix product and split it, then accumulate
            ``W_up σ(·)`` into the main output with one ``addmm`` (same result as :meth:`forward_reference`,
            the two-product version). ``W`` and ``W_down`` are stored as one ``(d_out + r, d_in)`` buffer
            (the parameters ``weight`` and ``down.weight`` are its row blocks), so the stacked matrix is a
            view, not a copy; state-dict keys, optimizer groups and ``from_linear``/``to_linear`` see two
            ordinary parameters.
        compiled_form: how a fused plain-sum layer computes under ``torch.compile``: ``stacked`` (as above) or
            ``kcat`` (:meth:`forward_kcat`); eager runs ignore it (see :data:`COMPILED_FORMS`).

    Input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 32,
                 rank_ratio: float | None = None, activation: str = "cosnet", fusion: str = "add",
                 dropout: float = 0.0, alpha: float = 1.0, fused: bool = True,
                 main_init: str = "paper", lr_mults: bool = True, compiled_form: str = "stacked",
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"NobleLinear needs in_features, out_features >= 1, "
                             f"got {in_features}, {out_features}")
        if rank_ratio is not None:
            if not rank_ratio > 0:
                raise ValueError(f"NobleLinear rank_ratio={rank_ratio} must be > 0 (e.g. 0.25)")
            rank = max(1, round(out_features * rank_ratio))
        if rank < 1:
            raise ValueError(f"NobleLinear rank={rank} must be >= 1")
        if fusion not in FUSIONS:
            raise ValueError(f"NobleLinear fusion={fusion!r} is not valid; "
                             f"choose one of {', '.join(FUSIONS)}")
        if fusion == "add" and alpha != 1.0:
            raise ValueError(f"NobleLinear alpha={alpha} only applies to fusion='gate'; with fusion='add' "
                             "(the paper's plain sum) leave alpha=1.0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"NobleLinear dropout={dropout} must be in [0, 1)")
        if compiled_form not in COMPILED_FORMS:
            raise ValueError(f"NobleLinear compiled_form={compiled_form!r} is not valid; "
                             f"choose one of {', '.join(COMPILED_FORMS)}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.activation, self.fusion, self.alpha, self.fused = activation, fusion, alpha, fused
        if main_init not in ("paper", "model"):
            raise ValueError(f"NobleLinear main_init={main_init!r} is not valid; choose paper or model")
        self.main_init, self.use_lr_mults, self.compiled_form = main_init, lr_mults, compiled_form
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.down = BranchLinear(in_features, rank, bias=True, **kw)
        self.act = make_activation(activation, rank, **kw)
        self.up = BranchLinear(rank, out_features, bias=False, **kw)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Parameter(torch.zeros((), **kw)) if fusion == "gate" else None
        self._plain_cls: type = nn.Linear  # what to_linear() rebuilds
        self.restack()
        self.register_load_state_dict_post_hook(_restack_after_load)
        self._register_state_dict_hook(_unshare_in_state_dict)
        self.reset_parameters()

    # ------------------------------------------------------------------ init and multipliers
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: W ~ N(0, 0.5/√d_in), b = 0, W_down ~ N(0, 1/√d_in), b_down = 0,
        W_up ~ N(0, 0.01/√r), CosNet as in :class:`CosNet`, gate w = 0."""
        self.weight.normal_(0.0, 0.5 / math.sqrt(self.in_features))
        if self.bias is not None:
            self.bias.zero_()
        self.reset_branch(zero_up=False)

    def post_init(self) -> None:
        """Called by ``TransformerLM.reset_parameters`` after its GPT-2 init: the paper's init for the branch,
        and for the main weight too unless ``main_init="model"`` (then it keeps the model's init, so a NOBLE
        model differs from its baseline only by the branches)."""
        if self.main_init == "model":
            self.reset_branch(zero_up=False)
        else:
            self.reset_parameters()

    @property
    def takes_model_init(self) -> bool:
        """Whether ``TransformerLM.reset_parameters`` gives the main weight its generic linear init."""
        return self.main_init == "model"

    @torch.no_grad()
    def reset_branch(self, zero_up: bool = False) -> None:
        """Re-initialise only the branch (and gate); ``zero_up=True`` makes the branch output exactly 0."""
        self.down.weight.normal_(0.0, 1.0 / math.sqrt(self.in_features))
        self.down.bias.zero_()
        if zero_up:
            self.up.weight.zero_()
        else:
            self.up.weight.normal_(0.0, 0.01 / math.sqrt(self.rank))
        if isinstance(self.act, CosNet):
            self.act.reset_parameters()
        if self.gate is not None:
            self.gate.zero_()

    def lr_mults(self) -> dict[str, float]:
        """Per-parameter learning-rate multipliers (official code), by parameter name; others are 1.

        W_up × (min(d_in, d_out)/r)^0.4, M × (min(d_in, d_out)/r)^0.5 (the official code attaches this
        one to the module, where it is lost), ω × 2, φ × 4, W_down × 1.
        """
        ratio = min(self.in_features, self.out_features) / self.rank
        mults = {"down.weight": 1.0, "down.bias": 1.0, "up.weight": ratio ** 0.4}
        if isinstance(self.act, CosNet):
            mults.update({"act.omega1": 2.0, "act.omega2": 2.0, "act.phi1": 4.0, "act.phi2": 4.0,
                          "act.M.weight": ratio ** 0.5, "act.M.bias": 1.0})
        if self.gate is not None:
            mults["gate"] = 1.0
        if not self.use_lr_mults:  # ablation: every branch parameter at the base learning rate
            mults = dict.fromkeys(mults, 1.0)
        return mults

    def optim_settings(self) -> dict[str, dict]:
        """The optimizer settings this layer declares (see :mod:`leanformer.train.optim`): its
        :meth:`lr_mults`. Biases, ω, φ and the gate are 0-/1-d, so the trainer's default leaves them undecayed."""
        return {name: {"lr_mult": mult} for name, mult in self.lr_mults().items()}


    # ------------------------------------------------------------------ storage
    @torch.no_grad()
    def restack(self) -> None:
        """Put ``weight`` and ``down.weight`` back into one ``(d_out + r, d_in)`` buffer, and ``bias`` and
        ``down.bias`` (when the layer has both) into one ``(d_out + r,)`` buffer (values kept, the Parameter
        objects kept). Called after construction, ``.to()``/``.half()`` (which move each parameter on its
        own), ``load_state_dict`` and ``from_linear``; a no-op for a pair that already shares one, for a layer
        whose parameters view a decoding copy's group stacks (``group_fused``), on the meta
        device and for tensor subclasses (FSDP2's DTensors), where :meth:`stacked_weight` and
        :meth:`stacked_bias` concatenate."""
        if self.group_fused:  # its parameters view a decoding copy's group stacks (fused_inputs.fuse_noble_linears)
            return
        pairs = [(self.weight, self.down.weight)]
        if self.bias is not None and self.down.bias is not None:
            pairs.append((self.bias, self.down.bias))
        for w, d in pairs:
            if (_adjacent(w, d) or w.device.type == "meta" or type(w) is not nn.Parameter
                    or type(d) is not nn.Parameter or w.dtype != d.dtype or w.device != d.device):
                continue
            buf = torch.cat([w.detach(), d.detach()], dim=0)
            w.data, d.data = buf[: self.out_features], buf[self.out_features:]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self.restack()
        return out

    def stacked_weight(self) -> torch.Tensor:
        """``[W; W_down]`` (d_out + r, d_in): a view of the shared buffer, or a concatenation when the two
        do not share one (or under ``torch.compile``, where inductor fuses the concatenation into the
        bf16 cast that every weight gets under autocast)."""
        w, d = self.weight, self.down.weight
        if not torch.compiler.is_compiling() and _adjacent(w, d):
            return _StackedRows.apply(w, d)
        return torch.cat([w, d], dim=0)

    def stacked_bias(self) -> torch.Tensor:
        """``[b; b_down]`` (d_out + r,) of a layer with a main bias: a view of the shared buffer, or a
        concatenation (as :meth:`stacked_weight`)."""
        b, d = self.bias, self.down.bias
        if not torch.compiler.is_compiling() and _adjacent(b, d):
            return _StackedRows.apply(b, d)
        return torch.cat([b, d], dim=0)

    # ------------------------------------------------------------------ forward
    def _main_and_down(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x Wᵀ + b, x W_downᵀ + b_down)``, fused or not."""
        if not self.fused:
            return F.linear(x, self.weight, self.bias), self.down(x)
        w = self.stacked_weight()  # (d_out + r, d_in)
        if self.bias is not None:
            b = self.stacked_bias()
        else:
            b = F.pad(self.down.bias, (self.out_features, 0))  # zeros for the main rows
        h = F.linear(x, w, b)  # (..., d_out + r)
        main, z = h.split([self.out_features, self.rank], dim=-1)
        # In training z gets a buffer of its own: the branch's backward keeps z (or σ(z)) until the backward
        # pass, and a view would keep all of h, the main output included, alive that long (docs/benchmarks.md,
        # "NOBLE's memory"). Without autograd (decoding) the copy would only add a launch.
        return main, z.contiguous() if z.requires_grad else z

    def _combine(self, main: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        branch = self.drop(self.up(self.act(z)))
        if self.gate is None:
            return main + branch
        g = torch.sigmoid(self.gate)
        return self.alpha * (g * main + (1.0 - g) * branch)

    decode_kernel = False  # a decoding copy's layers (leanformer.decoding.decoding_copy) set it: see forward
    group_fused = False  # set while fused_inputs.fuse_noble_linears stacks this layer with others: no restack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d_in) -> (..., d_out)``; the fused path when ``self.fused``. With ``decode_kernel`` set,
        a few rows of x go through :func:`leanformer.ops.noble_decode.noble_linear` (one launch) where it
        runs them."""
        if self.decode_kernel:
            from leanformer.ops.noble_decode import noble_linear

            y = noble_linear(self, x)
            if y is not None:
                return y
        plain_sum = self.fused and self.gate is None and isinstance(self.drop, nn.Identity)
        if plain_sum and torch.is_grad_enabled() and kernel_switch_allows("TRAIN_KERNEL", TRAIN_KERNEL, x):
            from leanformer.ops.noble_train import noble_train_linear, noble_train_reason

            if noble_train_reason(self, x) is None:
                return noble_train_linear(self, x, checked=True)
        if plain_sum and self.compiled_form == "kcat" and torch.compiler.is_compiling():
            return self.forward_kcat(x)
        main, z = self._main_and_down(x)
        if torch.compiler.is_compiling() or not plain_sum:
            # Under torch.compile the plain sum is better: inductor fuses ``main + branch`` into the next
            # element-wise kernel, while an addmm on the strided ``main`` (a column block of the stacked
            # product) costs a copy of it (measured on an H100: docs/gpu/train_profile_after.md)
            return self._combine(main, z)
        # eager: main + σ(z) W_upᵀ as one addmm, the product accumulated into the main output
        s = self.act(z)
        lead = main.shape[:-1]
        s2, main2 = s.reshape(-1, self.rank), main.reshape(-1, self.out_features)
        return torch.addmm(main2, s2, self.up.weight.t()).view(*lead, self.out_features)  # autocast: bf16

    def forward_kcat(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-sum layer as ``[x, σ(x W_downᵀ + b_down)] [W, W_up]ᵀ + b``: the branch's up-projection
        joins the main product along its inner axis (d_in + r), so one product and its two backward products
        do the work of three and six (see :data:`COMPILED_FORMS`). Fusion ``add`` without dropout only."""
        if self.gate is not None or not isinstance(self.drop, nn.Identity):
            raise ValueError("forward_kcat computes the plain sum: fusion='add' without dropout")
        s = self.act(self.down(x))                                             # (..., r)
        xs = torch.cat([x, s.to(x.dtype)], dim=-1)                             # (..., d_in + r)
        return F.linear(xs, torch.cat([self.weight, self.up.weight], dim=1), self.bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain version: two separate matrix products, then the branch."""
        return self._combine(F.linear(x, self.weight, self.bias), self.down(x))

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 32, activation: str = "cosnet",
                    preserve_output: bool = True, **kwargs: Any) -> NobleLinear:
        """A NobleLinear whose main path is ``linear`` (an ``nn.Linear`` or Hugging Face ``Conv1D``).

        The main weight and bias are kept bit for bit (an ``nn.Linear``'s parameters are reused, a
        ``Conv1D``'s ``(in, out)`` weight is transposed into our ``(out, in)`` layout). With
        ``preserve_output`` W_up = 0, so the layer's output equals ``linear``'s at the start; otherwise
        the branch gets the paper init. ``kwargs`` go to the constructor (rank_ratio, fusion, ...).
        """
        if isinstance(linear, NobleLinear):
            raise TypeError("from_linear got a NobleLinear already; it takes an nn.Linear or Conv1D")
        conv1d = _is_conv1d(linear)
        if not conv1d and not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear or transformers Conv1D, "
                            f"got {type(linear).__name__}")
        if preserve_output and kwargs.get("fusion", "add") == "gate":
            raise ValueError("preserve_output=True cannot hold with fusion='gate' (the gate scales the main "
                             "path by sigmoid(0) = 0.5 at init); use fusion='add' or preserve_output=False")
        weight = linear.weight
        d_in, d_out = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
        has_bias = getattr(linear, "bias", None) is not None
        layer = cls(d_in, d_out, bias=has_bias, rank=rank, activation=activation,
                    device=weight.device, dtype=weight.dtype, **kwargs)
        if conv1d:
            layer.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        else:
            layer.weight = weight
        if has_bias:
            layer.bias = linear.bias
        if preserve_output:
            layer.reset_branch(zero_up=True)
        layer._plain_cls = type(linear)
        layer.restack()  # the reused main weight joins W_down's buffer (same Parameter, same values)
        return layer

    def to_linear(self) -> nn.Module:
        """The main path alone as the plain module type it came from (``nn.Linear`` or ``Conv1D``).

        The branch is dropped, so outputs equal this layer's only while W_up = 0 (e.g. right after
        ``from_linear(..., preserve_output=True)``). An ``nn.Linear`` gets this layer's parameters.
        """
        if self._plain_cls is not nn.Linear and _is_conv1d_cls(self._plain_cls):
            plain = self._plain_cls(self.out_features, self.in_features)
            plain.weight = nn.Parameter(self.weight.detach().t().contiguous(),
                                        requires_grad=self.weight.requires_grad)
            plain.bias = self.bias
            return plain
        cls = self._plain_cls if issubclass(self._plain_cls, nn.Linear) else nn.Linear
        plain = torch.nn.utils.skip_init(cls, self.in_features, self.out_features, bias=self.bias is not None,
                                         device=self.weight.device, dtype=self.weight.dtype)
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    # ------------------------------------------------------------------ accounting
    def extra_params(self) -> int:
        """Parameters added by the branch (W_down, b_down, σ's, W_up, gate)."""
        return sum(p.numel() for n, p in self.named_parameters() if n not in ("weight", "bias"))

    def flops_per_token(self, include_main: bool = False) -> int:
        """Forward matmul FLOPs per token of the branch: 2(d_in r + r r + r d_out) with CosNet,
        2(d_in r + r d_out) otherwise (element-wise ops not counted); ``include_main`` adds 2 d_in d_out."""
        d_in, d_out, r = self.in_features, self.out_features, self.rank
        flops = 2 * (d_in * r + r * d_out + (r * r if isinstance(self.act, CosNet) else 0))
        return flops + (2 * d_in * d_out if include_main else 0)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, "
             f"rank={self.rank}, activation={self.activation}, fusion={self.fusion}, fused={self.fused}")
        if self.fusion == "gate":
            s += f", alpha={self.alpha}"
        if self.compiled_form != "stacked":
            s += f", compiled_form={self.compiled_form}"
        return s


def _is_conv1d_cls(cls: type) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return issubclass(cls, Conv1D)

