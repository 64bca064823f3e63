"""The head's product and the greedy choice in one kernel (:mod:`leanformer.ops.linear_argmax`): the logits
bit for bit the few-row kernel's, the index ``torch.argmax``'s (first maximum, ties across and within column
blocks, +inf, NaN, a row of -inf), its refusals, and a greedy decoder that decodes the same with it.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from leanformer import TransformerConfig, TransformerLM  # noqa: E402
from leanformer import decoding  # noqa: E402
from leanformer.decoding import StaticDecoder, decoding_copy  # noqa: E402
from leanformer.ops import linear_argmax as la  # noqa: E402
from leanformer.ops import skinny_linear as sl  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (see tests/conftest.py)", allow_module_level=True)


def _inputs(M, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


def _check(x, w, b):
    got = la.linear_argmax(x, w, b)
    assert got is not None
    logits, index = got
    torch.testing.assert_close(logits, sl.skinny_linear(x, w, b), rtol=0, atol=0, equal_nan=True)  # same bits
    assert index.dtype == torch.int64 and torch.equal(index, logits.argmax(-1))
    return logits, index


@pytest.mark.parametrize("M,K,N,bias", [(1, 96, 1000, True), (3, 200, 50, False), (8, 64, 333, True),
                                        (32, 32, 129, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logits_are_the_few_row_kernels_and_the_index_is_argmax(M, K, N, bias, dtype, monkeypatch):
    """Rows 1–32, K not a multiple of the block (200), N not of BLOCK_N, with and without bias."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    _check(*_inputs(M, K, N, dtype, bias))


def test_ties_pick_the_first_column_within_and_across_blocks(monkeypatch):
    """Equal rows of W give equal logits: the first of them wins, in one block (5, 9) or across (3, 700)."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(4, 64, 1000, torch.bfloat16)
    w[9], w[5], b[9], b[5] = w[5] * 9, w[5] * 9, 30.0, 30.0  # row 0..3: 5 and 9 tie (same block of 16)
    w[700], w[3], b[700], b[3] = w[3] * 0, w[3] * 0, 1e4, 1e4  # larger still: 3 and 700 tie (different blocks)
    logits, index = _check(x, w, b)
    assert index.tolist() == [3] * 4


@pytest.mark.parametrize("case,want", [("inf", 10), ("nan", 700), ("nan and inf", 700), ("all -inf", 0)])
def test_inf_nan_and_minus_inf_rank_as_argmax_ranks_them(case, want, monkeypatch):
    """+inf beats every number, NaN beats +inf (torch.argmax's order), a row of -inf picks column 0."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(2, 32, 800, torch.bfloat16)
    if case == "all -inf":
        b.fill_(float("-inf"))
    if "inf" in case and case != "all -inf":
        b[10] = float("inf")
    if "nan" in case:
        b[700] = float("nan")
    logits, index = _check(x, w, b)
    assert index.tolist() == [want, want]


def test_refusals_return_none_and_name_the_reason(monkeypatch):
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(2, 32, 64, torch.bfloat16)
    assert "bfloat16 or float16" in la.linear_argmax_supported(x.float(), w.float(), None)
    assert "(M, K)" in la.linear_argmax_supported(x[None], w, b)
    assert "rows" in la.linear_argmax_supported(torch.zeros(33, 32, dtype=x.dtype, device=DEV), w, b)
    monkeypatch.setattr(sl, "FMA_COLUMNS", 8)
    assert "FMA_COLUMNS" in la.linear_argmax_supported(x, w, b)
    assert la.linear_argmax(x, w, b) is None
    monkeypatch.setattr(sl, "FMA_COLUMNS", None)
    monkeypatch.setattr(sl, "ROUTE", "never")
    assert la.linear_argmax(x, w, b) is None


def test_greedy_decoder_decodes_the_same_with_the_argmax_in_the_head(monkeypatch):
    """A bf16 decoding copy, greedy, prefill then 4 steps: the same tokens and logits with ARGMAX_IN_HEAD
    on and off, and the kernel ran in the prefill and every step."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    copy = decoding_copy(model.eval()).to(DEV)
    monkeypatch.setattr(sl, "ROUTE", "always")
    calls = []
    real = la._linear_argmax_op
    monkeypatch.setattr(la, "_linear_argmax_op", lambda *a: calls.append(1) or real(*a))
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEV)
    out = {}
    for on in (False, True):
        monkeypatch.setattr(decoding, "ARGMAX_IN_HEAD", on)
        calls.clear()
        dec = StaticDecoder(copy, 2, capacity=12, graph="none", prefill_chunk=4)
        dec.prefill(prompt)
        logits = []
        for _ in range(4):
            dec.step()
            logits.append(dec.logits.clone())
        out[on] = (dec.tokens.clone(), torch.stack(logits), len(calls))
    assert out[False][2] == 0 and out[True][2] == 5
    assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])


def test_compiled_greedy_step_with_the_argmax_in_the_head(monkeypatch):
    """Under torch.compile (aot_eager, the op traced with its tuple of outputs) the step decodes the eager
    step's tokens and logits with ARGMAX_IN_HEAD on."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    copy = decoding_copy(model.eval()).to(DEV)
    monkeypatch.setattr(sl, "ROUTE", "always")
    monkeypatch.setattr(decoding, "ARGMAX_IN_HEAD", True)
    prompt = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(2)).to(DEV)
    decs = [StaticDecoder(copy, 2, capacity=8, graph="none", compile=c) for c in ("aot_eager", False)]
    for dec in decs:
        dec.prefill(prompt)
        dec.step()
        dec.step()
    assert torch.equal(decs[0].tokens, decs[1].tokens) and torch.equal(decs[0].logits, decs[1].logits)
