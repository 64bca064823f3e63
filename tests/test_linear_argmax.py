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
from decoding_routes import decode_each_route  # noqa: E402
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


@pytest.mark.parametrize("N", [1000, 7000], ids=["16-column blocks", "64-column blocks"])
def test_ties_pick_the_first_column_within_and_across_blocks(N, monkeypatch):
    """Equal logits: the first column wins, in one block (row 0: columns 5 and 9) and across blocks (row 1:
    columns 3 and 900); N 7,000 takes 64-column blocks as GPT-2's 50,304 do."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(2, 64, N, torch.bfloat16)
    x[0], x[1] = 0.0, 0.0  # the logits are the bias
    b.fill_(-1.0)
    b[9], b[5] = 30.0, 30.0
    w[:, 0] = 0.0
    x[1, 0] = 1.0  # row 1 adds column 0 of W: large at 3 and 900 only
    w[3, 0], w[900, 0] = 100.0, 100.0
    logits, index = _check(x, w, b)
    assert index.tolist() == [5, 3]


@pytest.mark.parametrize("case,want", [("inf", 10), ("nan", 700), ("nan and inf", 700), ("nan, inf in a block", 12),
                                       ("all -inf", 0), ("all negative", 998)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inf_nan_and_minus_inf_rank_as_argmax_ranks_them(case, want, dtype, monkeypatch):
    """+inf beats every number, NaN beats +inf (torch.argmax's order), a row of -inf picks column 0, and a
    row of negative logits never picks a column past N (N 1,000: the last block is partly empty)."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(2, 32, 1000, dtype)
    if case.startswith("all"):
        x.zero_()
        b.fill_(float("-inf") if case == "all -inf" else -5.0)
        b[998] = -1.0 if case == "all negative" else b[998]
    if "inf" in case and not case.startswith("all"):
        b[10] = float("inf")
    if case.startswith("nan"):
        b[700 if "block" not in case else 12] = float("nan")
    logits, index = _check(x, w, b)
    assert index.tolist() == [want, want]


def test_overflowing_fp16_logits_tie_as_stored(monkeypatch):
    """fp16 logits past 65,504 round to +inf: the first of them wins, as argmax over the stored logits."""
    monkeypatch.setattr(sl, "ROUTE", "always")
    x, w, b = _inputs(1, 16, 300, torch.float16)
    x.zero_()
    x[0, 0] = 1.0
    w[:, 0] = 0.0
    w[40, 0], w[41, 0], w[200, 0] = 60000.0, 65000.0, 30000.0
    b[40], b[41], b[200] = 30000.0, 20000.0, 20000.0  # 90,000 and 85,000: both +inf; 50,000 finite
    logits, index = _check(x, w, b)
    assert torch.isinf(logits[0, 40]) and torch.isinf(logits[0, 41]) and index.tolist() == [40]


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
    """A bf16 decoding copy, greedy, prefill then 3 steps: the same tokens and logits with ARGMAX_IN_HEAD
    on and off, and the kernel ran in the prefill and every step."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    copy = decoding_copy(model.eval()).to(DEV)
    monkeypatch.setattr(sl, "ROUTE", "always")
    out = decode_each_route(copy, la, "_linear_argmax_op", monkeypatch, DEV, routes=(False, True),
                            switch=(decoding, "ARGMAX_IN_HEAD"))
    assert len(out[False][2]) == 0 and len(out[True][2]) == 4
    assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])


def test_compiled_greedy_step_with_the_argmax_in_the_head(monkeypatch):
    """Under torch.compile (aot_eager, the op traced with its tuple of outputs) the step runs the kernel and
    decodes the eager step's tokens and logits with ARGMAX_IN_HEAD on, and those of the step without it."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    copy = decoding_copy(model.eval()).to(DEV)
    monkeypatch.setattr(sl, "ROUTE", "always")
    monkeypatch.setattr(decoding, "ARGMAX_IN_HEAD", True)
    prompt = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(2)).to(DEV)
    calls = []
    real = la._linear_argmax_op
    monkeypatch.setattr(la, "_linear_argmax_op", lambda *a: calls.append(1) or real(*a))
    decs = []
    for compiled, on in (("aot_eager", True), (False, True), (False, False)):
        monkeypatch.setattr(decoding, "ARGMAX_IN_HEAD", on)
        dec = StaticDecoder(copy, 2, capacity=8, graph="none", compile=compiled)
        dec.prefill(prompt)
        calls.clear()
        dec.step()
        dec.step()
        assert len(calls) == (2 if on else 0)
        decs.append(dec)
    for dec in decs[1:]:
        assert torch.equal(decs[0].tokens, dec.tokens) and torch.equal(decs[0].logits, dec.logits)
