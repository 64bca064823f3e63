"""The per-token gated route of DiJiang's decayed form (leanformer.ops.token_gates) against the float64
forms of leanformer.ops.decayed_linear_attention: same outputs and final states, with and without an
initial state and log-normaliser, gates ≤ 0 for the model's running normaliser, nothing non-finite where
the first token's n is very negative. fla's kernel for it runs on the GPU only (test_device_equivalence)."""

from __future__ import annotations

import pytest
import torch
from decayed_inputs import decayed_inputs

from leanformer.ops import decayed_linear_attention as dla
from leanformer.ops.token_gates import gated_recurrent, token_gates, via_token_gates

F64 = torch.float64


@pytest.mark.parametrize("with_n0", [False, True])
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_gated_route_equals_the_recurrent_form(with_norm, with_state, with_n0):
    """Also a state handed in without its n (taken at 0, as the other forms take it)."""
    q, k, v, lg, n = decayed_inputs()
    n = n if with_norm else None
    S0 = torch.randn(2, 3, 5, 4, dtype=F64) if with_state else None
    n0 = torch.randn(2, 3, dtype=F64) - 4 if with_n0 else None
    ref, S_ref = dla.recurrent(q, k, v, lg, S0, n, n0)
    out, S = via_token_gates(gated_recurrent, q, k, v, lg, S0, n, n0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S, S_ref)


def test_gated_route_continues_a_prompt_as_one_pass():
    """A prompt split in two (the second half from the first's state and n) equals the whole prompt."""
    q, k, v, lg, n = decayed_inputs(T=12)
    whole, S_whole = dla.parallel(q, k, v, lg, log_norm=n)
    first, S1 = via_token_gates(gated_recurrent, q[:, :, :5], k[:, :, :5], v[:, :, :5], lg, None, n[..., :5])
    second, S2 = via_token_gates(gated_recurrent, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], lg, S1, n[..., 5:],
                                 n[..., 4])
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole)
    torch.testing.assert_close(S2, S_whole)


def test_gates_of_the_running_normaliser_are_never_positive():
    _, _, _, lg, n = decayed_inputs(T=64)
    g = token_gates(lg, n.shape, n)
    assert g.dtype == F64 and g.shape == n.shape  # at least float32: float64 stays
    assert (g <= 1e-6).all()
    torch.testing.assert_close(g[..., 0], lg.expand(2, 3))  # no initial state: g_0 = logγ


def test_a_very_negative_first_normaliser_without_state_stays_finite():
    """n_0 = −200 with no initial state: taking n_{−1} = 0 would give exp(g_0) = inf and inf·0 = NaN."""
    q, k, v, lg, n = decayed_inputs(T=6)
    n = n.float() - 200.0
    out, S = via_token_gates(gated_recurrent, q.float(), k.float(), v.float(), lg.float(), None, n)
    ref, S_ref = dla.recurrent(q.float(), k.float(), v.float(), lg.float(), log_norm=n)
    assert torch.isfinite(out).all() and torch.isfinite(S).all()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S, S_ref)


def test_an_initial_normaliser_of_minus_infinity_gives_a_floored_first_gate():
    """n₀ = −inf (the state before any token) with a zero state: g_0 = −inf would make fla's cumulative sum
    NaN; it is floored, and the result equals the recurrent form's."""
    q, k, v, lg, n = decayed_inputs(T=6)
    n0 = torch.full((2, 3), float("-inf"), dtype=F64)
    S0 = torch.zeros(2, 3, 5, 4, dtype=F64)
    g = token_gates(lg, n.shape, n, n0)
    assert torch.isfinite(g).all() and (g[..., 0] == -100.0).all()
    out, S = via_token_gates(gated_recurrent, q, k, v, lg, S0, n, n0)
    ref, S_ref = dla.recurrent(q, k, v, lg, None, n)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S, S_ref)


def test_fla_gated_form_checks_shapes_before_running():
    q, k, v, lg, n = decayed_inputs(T=4)
    with torch.no_grad(), pytest.raises(ValueError, match="log_gamma must have shape"):
        dla.fla_gated(q.float(), k.float(), v.float(), lg[:2].float(), log_norm=n.float())


def test_fla_gated_form_has_a_clear_error_without_cuda():
    q, k, v, lg, n = decayed_inputs(T=4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="fla|CUDA"):
        dla.fla_gated(q.float(), k.float(), v.float(), lg.float(), log_norm=n.float())
