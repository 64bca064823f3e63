"""``leanformer bench decode --path static``: the static path's rows, sizes, and the expanded decoder."""

import json

import pytest
import torch

from leanformer.cli import main


def test_bench_decode_static_path_tiny(tmp_path):
    out = tmp_path / "dec"
    rc = main(["bench", "decode", "--size", "tiny", "--arms", "preln,dijiang", "--contexts", "16,48",
               "--batches", "1,3", "--path", "static", "--steps", "2", "--warmup", "1", "--prefill-chunk", "32",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "decode.json").read_text())
    assert data["settings"]["path"] == "static"
    rows = data["results"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["prefill_s"] > 0
    state = {(r["arm"], r["context"], r["batch"]): r["cache_bytes"] for r in rows}
    assert state["preln", 48, 1] > state["preln", 16, 1]
    assert state["preln", 16, 3] == 3 * state["preln", 16, 1]
    assert state["dijiang", 48, 1] == state["dijiang", 16, 1]
    assert "first token s" in (out / "decode.md").read_text()


def test_bench_decode_rejects_graph_on_cpu(capsys):
    assert main(["bench", "decode", "--size", "tiny", "--path", "graph", "--device", "cpu"]) == 2
    assert "--path graph needs CUDA" in capsys.readouterr().err


def test_expanded_decoder_steps_equal_a_batch_of_copies():
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.decoding import StaticDecoder
    from leanformer.model import TransformerLM

    for arm in ("preln", "dijiang", "sas_p"):
        torch.manual_seed(0)
        model = TransformerLM(arm_config(base_config(SIZES["tiny"], 64), arm)).double().eval()
        prompt = torch.randint(0, SIZES["tiny"].vocab_size, (1, 9))
        one = StaticDecoder(model, 1, 16, graph="none", prefill_chunk=4)
        one.prefill(prompt)
        wide = one.expanded(3)
        three = StaticDecoder(model, 3, 16, graph="none", prefill_chunk=4)
        three.prefill(prompt.expand(3, -1))
        for _ in range(3):
            wide.step()
            three.step()
            torch.testing.assert_close(wide.logits, three.logits)
        assert torch.equal(wide.tokens, three.tokens)


def test_bench_decode_compile_needs_the_static_path(capsys):
    assert main(["bench", "decode", "--size", "tiny", "--path", "eager", "--compile", "--device", "cpu"]) == 2
    assert "--compile applies to the static step" in capsys.readouterr().err


def test_bench_decode_compile_mode_is_checked(capsys):
    """--compile-mode needs --compile, and a mode with CUDA graphs of its own is refused by name."""
    assert main(["bench", "decode", "--size", "tiny", "--path", "static", "--compile-mode",
                 "max-autotune-no-cudagraphs", "--device", "cpu"]) == 2
    assert "--compile-mode max-autotune-no-cudagraphs needs --compile" in capsys.readouterr().err
    assert main(["bench", "decode", "--size", "tiny", "--path", "static", "--compile", "--compile-mode",
                 "reduce-overhead", "--device", "cpu"]) == 2
    assert "--compile-mode 'reduce-overhead' is not valid; choose default, max-autotune-no-cudagraphs" in \
        capsys.readouterr().err
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.decoding import StaticDecoder
    from leanformer.model import TransformerLM

    model = TransformerLM(arm_config(base_config(SIZES["tiny"], 64), "preln")).eval()
    with pytest.raises(ValueError, match="compile_mode='max-autotune' is not valid"):
        StaticDecoder(model, 1, 8, graph="none", compile=True, compile_mode="max-autotune")
    with pytest.raises(ValueError, match="compile_mode='default' needs compile=True"):
        StaticDecoder(model, 1, 8, graph="none", compile_mode="default")


def test_expanded_cache_at_batch_one_is_a_copy():
    """expanded(1) owns its state: its steps leave the source decoder's caches as they were (review: a 1-row
    expand made contiguous is the row itself)."""
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.decoding import StaticDecoder
    from leanformer.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(arm_config(base_config(SIZES["tiny"], 64), "sas_p")).eval()
    dec = StaticDecoder(model, 1, 16, graph="none")
    dec.prefill(torch.randint(0, SIZES["tiny"].vocab_size, (1, 5)))
    before = {(i, k): t.clone() for i, layer in enumerate(dec.cache.layers) for k, t in layer.items()
              if isinstance(t, torch.Tensor)}
    one = dec.expanded(1)
    one.step()
    for (i, k), t in before.items():
        assert torch.equal(dec.cache.layers[i][k], t), (i, k)
