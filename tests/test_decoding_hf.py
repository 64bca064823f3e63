"""The Hugging Face export's generate(): plain greedy / sampling calls take the static decoder (CUDA by
default; forced here on the CPU) and return what Hugging Face's own loop returns (tokens, EOS, padding)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from leanformer.hf.exporter import to_hf_model  # noqa: E402
from leanformer.hf.modeling import _finish_at_eos  # noqa: E402

V = 61
IDS = torch.randint(10, V, (2, 9), generator=torch.Generator().manual_seed(3))  # no pad ids in the prompt


def _hf(**kw):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return to_hf_model(model.eval()).eval()


@pytest.mark.parametrize("kw", [{}, {"attention": "dijiang"}, {"attention": "shaped", "block": "sas_p"}])
def test_static_greedy_equals_hugging_face_loop(kw):
    hf = _hf(**kw)
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    theirs = hf.generate(IDS, static_decoding=False, **args)
    ours = hf.generate(IDS, static_decoding=True, **args)
    assert torch.equal(ours, theirs)


def test_static_generate_stops_at_eos_like_hugging_face():
    hf = _hf()
    free = hf.generate(IDS, max_new_tokens=8, do_sample=False, static_decoding=False, eos_token_id=None,
                       pad_token_id=0)
    eos = int(free[0, 11])  # a token that row 0 generates: it ends there
    for pad in (0, 5):
        args = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        theirs = hf.generate(IDS, static_decoding=False, **args)
        assert torch.equal(hf.generate(IDS, static_decoding=True, **args), theirs)


def test_what_the_static_decoder_cannot_do_goes_to_hugging_face():
    hf = _hf()
    args = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    # beams and a repetition penalty: Hugging Face's loop (static_decoding=True only asks, never forces them)
    for extra in ({"num_beams": 2}, {"repetition_penalty": 1.3}):
        assert torch.equal(hf.generate(IDS, static_decoding=True, **args, **extra),
                           hf.generate(IDS, static_decoding=False, **args, **extra))
    assert hf._static_generate(IDS, None, {"num_beams": 2, **args}, force=True) is None
    assert hf._static_generate(IDS, None, dict(args), force=False) is None  # the CPU: not by default
    out = hf._static_generate(IDS, None, dict(args, do_sample=True, top_k=5, top_p=0.8), force=True)
    assert out.shape == (2, 14)


def test_finish_at_eos_rule():
    out = torch.tensor([[1, 2, 7, 3, 7, 4], [1, 2, 5, 6, 7, 8]])
    got = _finish_at_eos(out, 2, 7, pad=0)
    assert torch.equal(got, torch.tensor([[1, 2, 7, 0, 0], [1, 2, 5, 6, 7]]))
    assert torch.equal(_finish_at_eos(out, 2, [9], pad=0), out)  # no row ends: unchanged
