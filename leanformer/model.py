"""The language model, assembled from a :class:`TransformerConfig`: a decoder, or (``causal: false``) an encoder.

``TransformerLM(cfg)(idx)`` maps token ids (B, T) to logits (B, T, V). Blocks and attention types come
from :mod:`leanformer.registry`; linear layers from :func:`leanformer.layers.linear.make_linear`.
``features(idx, attention_mask)`` gives the final-normed hidden states (B, T, C) that the LM head reads,
with padded positions masked out of attention: what a classification head on an encoder reads.
An encoder (``cfg.causal`` false) has no decoding: ``generate``, ``new_cache`` and any cache refuse it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.config import TransformerConfig
from leanformer.decoding import StaticCache, StaticDecoder, check_sampling, sample_next
from leanformer.layers.norms import make_norm
from leanformer.ops import linear_cross_entropy
from leanformer.ops.on_cuda import kernel_switch_allows
from leanformer.registry import attention_spec, build_block

_RESIDUAL_OUTPUTS = ("attn.o", "mlp.ffn_out")


class DecodeCache:
    """Per-layer decoding state (KV cache, or DiJiang's recurrent state) plus the position reached."""

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.pos = 0

    def memory_bytes(self) -> int:
        """Bytes of decoding state in use (grows with context for a KV cache, not for DiJiang). A KV cache's
        pre-allocated spare capacity (at most half again, see ``append_to_cache``) is not counted."""
        total = 0
        for state in self.layers:
            for key, t in state.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if key.endswith("_buf"):  # (B, H, capacity, D): count the filled slots
                    t = t[:, :, : state[key[:-4] + "_len"]]
                total += t.numel() * t.element_size()
        return total

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows ``index`` of every cached tensor (beam search / Hugging Face generate)."""
        for s in self.layers:
            for key, t in s.items():
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    s[key] = t.index_select(0, index.to(t.device))


class TransformerLM(nn.Module):
    """GPT-style LM: embeddings → ``n_layers`` blocks → final norm → LM head."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(build_block(cfg, i) for i in range(cfg.n_layers))
        # The final norm stays even when block norms are removed (SAS-P without norm keeps it).
        self.norm_f = make_norm(cfg, "rmsnorm" if cfg.norm == "none" else cfg.norm)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """GPT-2 init for plain layers (N(0, σ), residual outputs σ/√(2L), zero biases) and for any layer whose
        ``takes_model_init`` is true, then each module's own ``post_init()`` (NOBLE, shaped attention,
        DiJiang set their own). docs/methods.md, section 0, says why σ/√(2L)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if type(module) is nn.Linear or getattr(module, "takes_model_init", False):  # a layer may opt in
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(_RESIDUAL_OUTPUTS) else 1.0
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif type(module) is nn.Embedding:
                nn.init.normal_(module.weight, 0.0, std)
        for module in reversed(list(self.modules())):  # children first: a parent's post_init wins
            if module is not self and hasattr(module, "post_init"):
                module.post_init()

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: DecodeCache | StaticCache | None = None,
                attention_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) int64 → (logits (B, T, V), mean cross-entropy or None).

        ``targets`` (B, T): the token each position predicts (the next one for a causal LM, the original
        token at a masked position for an encoder), ``-100`` where nothing is predicted (ignored).
        With ``cache`` (a :class:`DecodeCache` or a :class:`leanformer.decoding.StaticCache`), ``idx``
        holds only the new tokens; the cache is advanced in place. ``attention_mask``: see :meth:`features`.
        ``return_logits`` False (with ``targets``): (None, loss), for a training step that reads only the loss.
        Under ``torch.compile`` the logits are then no output of the graph, so its backward gets no gradient
        for them: a GPT-2 step at batch 16 otherwise filled a zero (B, T, V) bf16 gradient (0.50 ms) and copied
        it into the CUDA graph's input (1.09 ms, 1.65 GB) (H100, 2026-12-07 14:15, benchmarks/step_copies.py).
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them the logits are all there is to return")
        head = self.lm_head
        if (not return_logits and type(head) is nn.Linear
                and kernel_switch_allows("linear_cross_entropy.FUSED", linear_cross_entropy.FUSED, head.weight)
                and linear_cross_entropy.fused_dtype_ok(head.weight)
                and not head._forward_pre_hooks and not head._forward_hooks):  # its weight as the forward reads it
            h = self.hidden_states(idx, cache, attention_mask)  # the logits in chunks, never whole
            loss = linear_cross_entropy.linear_cross_entropy(h, head.weight, head.bias, targets)
            return None, loss.float()  # float32, as the plain route's
        logits = head(self.hidden_states(idx, cache, attention_mask))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
        return (logits if return_logits else None), loss

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids → (B, T, d_model): the final-normed hidden states the LM head reads.

        ``attention_mask`` (B, T): 1 (or True) for a token, 0 for padding. Padded keys get no attention
        weight (softmax attention: masked out; shaped attention: also left out of the centring mean,
        docs/methods.md), so with the padding at the end of each row (left-aligned tokens) the tokens'
        features are those of the unpadded sequences; the features at padded positions are meaningless.
        Positions count from the first column, so put the padding at the end. Without a mask every
        position is a token (= :meth:`hidden_states`). Works for encoders and causal models alike.
        """
        return self.hidden_states(idx, attention_mask=attention_mask)

    def hidden_states(self, idx: torch.Tensor, cache: DecodeCache | StaticCache | None = None,
                      attention_mask: torch.Tensor | None = None, blocks: list | None = None) -> torch.Tensor:
        """idx: (B, T) → the final-normed hidden states (B, T, C) that the LM head maps to logits.

        ``attention_mask`` (B, T), 1 = token, 0 = padding (:meth:`features`); not with a ``cache``.
        ``blocks``: callables run in place of ``self.blocks``, one each (a decoder's compiled blocks).
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be (B, T) integer token ids, got shape {tuple(idx.shape)} of {idx.dtype}")
        if cache is not None:
            self.cfg.require_causal("decoding with a cache")
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, idx, cache)
        B, T = idx.shape
        static = getattr(cache, "static", False)
        if static:  # positions as a device tensor (a graph's counter in a fixed-shape step)
            positions = cache.begin(T, B, idx.device)
        else:
            start = cache.pos if cache is not None else 0
            if self.wpe is not None and start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len} "
                                 "(learned positions)")
            positions = torch.arange(start, start + T, device=idx.device) if self.wpe is not None else None
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        masked = {} if attention_mask is None else {"attention_mask": attention_mask}
        for i, block in enumerate(self.blocks if blocks is None else blocks):
            x = block(x, cache.layers[i] if cache is not None else None, **masked)
        if static:
            cache.advance(T)
        elif cache is not None:
            cache.pos = start + T
        return self.norm_f(x)

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor, idx: torch.Tensor, cache) -> torch.Tensor:
        """A (B, T) mask of 0/1 (or bool) matching ``idx``, on its device; not together with a cache."""
        if cache is not None:
            raise ValueError("attention_mask is for a full pass over padded sequences, not with a decoding cache")
        if tuple(attention_mask.shape) != tuple(idx.shape):
            raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)} (1 = token, "
                             f"0 = padding), got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
        return attention_mask.to(idx.device).bool()

    def new_cache(self) -> DecodeCache:
        self.cfg.require_causal("a decoding cache")
        return DecodeCache(self.cfg.n_layers)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 top_p: float | None = None, static: bool | None = None, max_len: int | None = None,
                 graph: str = "auto", compile: bool | str = False) -> torch.Tensor:
        """Sample ``max_new_tokens`` after the prompt ``idx`` (B, T); returns (B, T + max_new_tokens).

        ``temperature=0`` is greedy; otherwise draws from the softmax cut to ``top_k`` / ``top_p``
        (:func:`leanformer.decoding.sample_next`, the same draws on both paths for one generator).
        ``static`` (default: on CUDA) decodes through :class:`leanformer.decoding.StaticDecoder`: caches
        pre-allocated to ``max_len`` tokens (default ``T + max_new_tokens``), the step a CUDA graph
        (``graph``: auto, cuda, none; ``compile=True`` fuses the step with ``torch.compile`` first).
        ``static=False`` is the eager reference path
        (:class:`DecodeCache`, growing caches), the default on the CPU.
        """
        self.cfg.require_causal("generate()")
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if static is None:
            static = idx.is_cuda
        if static:
            need = idx.shape[1] + max_new_tokens
            capacity = max_len if max_len is not None else need
            if need > capacity:
                raise ValueError(f"prompt of {idx.shape[1]} tokens + {max_new_tokens} new tokens = {need} "
                                 f"exceeds max_len={capacity}")
            decoder = StaticDecoder(self, idx.shape[0], capacity, graph=graph, compile=compile, **sampling)
            return decoder.generate(idx, max_new_tokens)
        cache = self.new_cache()
        logits, _ = self(idx, cache=cache)
        out = [idx]
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], **sampling)[:, None]
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, _ = self(nxt, cache=cache)
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); ``non_embedding`` drops token/position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N (matmul params incl. the head) + L × the attention type's own term
        (Kaplan et al. 2020; PaLM appendix B), declared by its :class:`~leanformer.registry.AttentionSpec`:
        12·C·T for softmax/shaped (QKᵀ and AV, fwd+bwd), 12·H·m·d_head for DiJiang's linear form."""
        cfg = self.cfg
        head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0  # untied: already counted
        n_matmul = self.num_params(non_embedding=True) + head
        attn = cfg.n_layers * attention_spec(cfg.attention).flops_per_token(cfg, seq_len)
        return 6 * n_matmul + attn

    def decode_state_bytes(self, context: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of decoding state after ``context`` tokens of ``batch`` sequences, as the attention type's
        spec declares it (what :meth:`DecodeCache.memory_bytes` measures): a KV cache grows with the
        context, a recurrent state does not. ``dtype``: the activations' (default: the parameters')."""
        spec = attention_spec(self.cfg.attention)
        dtype = dtype or next(self.parameters()).dtype
        per_layer = context * spec.state_bytes_per_token(self.cfg, dtype) + spec.state_bytes_per_sequence(
            self.cfg, dtype)
        return self.cfg.n_layers * batch * per_layer

    def summary(self) -> dict:
        """Parameter counts, including the NOBLE branches' share and their forward FLOPs per token."""
        from leanformer.layers.noble import NobleLinear

        nobles = [m for m in self.modules() if isinstance(m, NobleLinear)]
        return {
            "params": self.num_params(),
            "non_embedding_params": self.num_params(non_embedding=True),
            "noble_branch_params": sum(m.extra_params() for m in nobles),
            "noble_branch_flops_per_token": sum(m.flops_per_token() for m in nobles),
            "block": self.cfg.block,
            "attention": self.cfg.attention,
            "noble": self.cfg.noble.enabled,
        }
