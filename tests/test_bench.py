"""``leanformer bench``: each subcommand end to end on the tiny size; the timer and the memory meter.

Speed is never asserted: only that the outputs exist, hold finite numbers and say what they measured.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanformer.bench import machine, memory, report, timing
from leanformer.cli import main
from leanformer.config import ConfigError

CPU = ["--device", "cpu", "--threads", "1"]


def _load(out, name: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext} missing or empty"
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{name}.json").read_text())


def _finite(row: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def _check_meta(data: dict, md: str, sub: str) -> None:
    meta = data["meta"]
    assert meta["command"].startswith(f"leanformer bench {sub}") and meta["torch"] == torch.__version__
    assert meta["machine"] and meta["date"]
    assert meta["command"] in md and meta["machine"] in md


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train"
    arms = "preln,noble_fused,sas_p_nonorm,dijiang,dijiang_fla"
    rc = main(["bench", "train", "--size", "tiny", "--arms", arms,
               "--repeats", "2", "--warmup", "1", "--peak-flops", "1e12", "--out", str(out), *CPU])
    assert rc == 0
    data = _load(out, "train")
    _check_meta(data, (out / "train.md").read_text(), "train")
    rows = {r["arm"]: r for r in data["results"]}
    assert list(rows) == ["preln", "noble_fused", "sas_p_nonorm", "dijiang", "dijiang_fla"]
    for arm in ("preln", "noble_fused", "sas_p_nonorm", "dijiang"):
        assert rows[arm]["status"] == "ok", rows[arm]
        _finite(rows[arm], ("step_ms", "tokens_per_s", "mfu", "peak_mem_bytes", "speed_vs_preln", "loss"))
    assert rows["preln"]["speed_vs_preln"] == 1.0
    # NOBLE adds parameters; the accounted memory grows with them (params, grads, two AdamW moments)
    assert rows["noble_fused"]["params"] > rows["preln"]["params"]
    assert rows["noble_fused"]["peak_mem_bytes"] > rows["preln"]["peak_mem_bytes"]
    assert rows["dijiang_fla"]["status"].startswith("unavailable")  # CPU: reported, not a crash
    # compile=auto: eager only on CPU; each arm's FLOP ratio to preln, its inverse and the share realised
    assert all(r["compile"] is False for r in data["results"])
    for arm in ("noble_fused", "sas_p_nonorm"):
        r = rows[arm]
        assert r["flops_vs_preln"] == pytest.approx(r["flops_per_token"] / rows["preln"]["flops_per_token"])
        assert r["flop_limit_speed"] == pytest.approx(1 / r["flops_vs_preln"])
        assert r["realised"] == pytest.approx(r["speed_vs_preln"] / r["flop_limit_speed"])
    assert rows["noble_fused"]["flops_vs_preln"] > 1 > rows["sas_p_nonorm"]["flops_vs_preln"]
    md = (out / "train.md").read_text()
    assert "FLOP-limit × preln" in md and "realised" in md


def test_bench_train_with_gpt2s_learned_positions(tmp_path):
    """--pos learned: every arm with a learned position table (GPT-2's own; one more (T, d) parameter than RoPE's
    run of the same arm), recorded in the settings."""
    params = {}
    for pos in ("rope", "learned"):
        out = tmp_path / pos
        assert main(["bench", "train", "--size", "tiny", "--arms", "preln", "--pos", pos, "--repeats", "1",
                     "--warmup", "0", "--out", str(out), *CPU]) == 0
        data = _load(out, "train")
        assert data["settings"]["pos"] == pos and data["results"][0]["status"] == "ok"
        params[pos] = data["results"][0]["params"]
    assert params["learned"] - params["rope"] == 32 * 32  # tiny: seq 32, d_model 32


def test_bench_attention_tiny(tmp_path):
    out = tmp_path / "attn"
    rc = main(["bench", "attention", "--lengths", "32,64", "--heads", "2", "--head-dim", "16",
               "--repeats", "2", "--warmup", "1", "--out", str(out), *CPU])
    assert rc == 0
    data = _load(out, "attention")
    _check_meta(data, (out / "attention.md").read_text(), "attention")
    rows = data["results"]
    assert {(r["method"], r["seq_len"]) for r in rows} == {
        (m, t) for m in ("softmax", "shaped", "dijiang_parallel", "dijiang_chunk", "dijiang_fla")
        for t in (32, 64)}
    for r in rows:
        if r["method"] == "dijiang_fla":
            assert r["status"].startswith("unavailable")
        else:
            assert r["status"] == "ok", r
            _finite(r, ("ms", "mem_bytes", "speedup_vs_softmax"))


def test_bench_attention_skips_parallel_over_memory(tmp_path):
    out = tmp_path / "attn"
    rc = main(["bench", "attention", "--lengths", "64", "--methods", "dijiang_parallel,dijiang_chunk",
               "--heads", "1", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
               "--max-memory-gb", "1e-9", "--out", str(out), *CPU])
    assert rc == 0
    status = {r["method"]: r["status"] for r in json.loads((out / "attention.json").read_text())["results"]}
    assert status == {"softmax": "ok", "dijiang_parallel": "skipped (memory)", "dijiang_chunk": "ok"}
    assert "skipped (memory)" in (out / "attention.md").read_text()


def test_bench_decode_tiny(tmp_path):
    out = tmp_path / "dec"
    rc = main(["bench", "decode", "--size", "tiny", "--contexts", "16,48", "--batches", "1,3",
               "--steps", "2", "--warmup", "1", "--prefill-chunk", "32", "--out", str(out), *CPU])
    assert rc == 0
    data = _load(out, "decode")
    _check_meta(data, (out / "decode.md").read_text(), "decode")
    rows = data["results"]
    assert len(rows) == 4 * 2 * 2  # preln, dijiang, sas_p, noble_fused × 2 contexts × 2 batches
    for r in rows:
        assert r["status"] == "ok", r
        _finite(r, ("ms_per_step", "tokens_per_s", "cache_bytes", "peak_mem_bytes", "speed_vs_softmax"))
    cache = {(r["arm"], r["context"], r["batch"]): r["cache_bytes"] for r in rows}
    # a KV cache grows with context and batch; DiJiang's recurrent state only with batch
    assert cache["preln", 48, 1] > cache["preln", 16, 1]
    assert cache["preln", 16, 3] == 3 * cache["preln", 16, 1]
    assert cache["dijiang", 48, 1] == cache["dijiang", 16, 1]


def test_bench_decode_kernels_option_sets_and_restores_switches(tmp_path, monkeypatch):
    """--kernels sets the named switches for the run only (seen by the model while it decodes), is written
    in the report's command, and a bad name or choice is refused naming the choices."""
    import leanformer.decoding as decoding
    from leanformer.bench import kernel_switches as ks
    from leanformer.ops import fused_decay_step, skinny_linear

    seen = []
    real = decoding.sample_next

    def spy(*a, **k):
        seen.append((decoding.TWO_PASS_ARGMAX, skinny_linear.ROUTE, fused_decay_step.SINGLE_PASS))
        return real(*a, **k)
    monkeypatch.setattr(decoding, "sample_next", spy)
    before = (decoding.TWO_PASS_ARGMAX, skinny_linear.ROUTE, fused_decay_step.SINGLE_PASS)
    out = tmp_path / "dec"
    rc = main(["bench", "decode", "--size", "tiny", "--arms", "preln", "--contexts", "16", "--batches", "1",
               "--steps", "2", "--warmup", "1", "--path", "static", "--out", str(out),
               "--kernels", "argmax=two-pass, products=cublas,step=single", *CPU])
    assert rc == 0 and seen and set(seen) == {(True, "never", True)}
    assert (decoding.TWO_PASS_ARGMAX, skinny_linear.ROUTE, fused_decay_step.SINGLE_PASS) == before
    assert "--kernels" in _load(out, "decode")["meta"]["command"]
    for bad, message in (("argmax", "name=choice"), ("warp=on", "name=choice"), ("pdl=maybe", "choose off, on")):
        with pytest.raises(ConfigError, match=message):
            ks.parse_kernels(bad)
    assert ks.parse_kernels("noble-k=split") == {"leanformer.ops.noble_decode.SPLIT_K": True}


def test_expand_cache_replicates_rows():
    from leanformer.bench.decode import expand_cache, prefill
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.model import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(arm_config(base_config(SIZES["tiny"], 64), "dijiang")).eval()
    cache, _ = prefill(model, 20, 8, torch.device("cpu"), SIZES["tiny"].vocab_size)
    big = expand_cache(cache, 3)
    assert big.pos == cache.pos == 20
    nxt = torch.tensor([[5]])
    with torch.no_grad():
        one = model(nxt, cache=cache)[0]
        three = model(nxt.expand(3, 1), cache=big)[0]
    torch.testing.assert_close(three, one.expand(3, -1, -1))


@pytest.mark.parametrize("argv, message", [
    (["bench", "train", "--size", "tiny", "--arms", "preln,bogus"], "unknown arm(s) 'bogus'"),
    (["bench", "train", "--size", "huge"], "--size 'huge' is not valid"),
    (["bench", "decode", "--size", "huge"], "--size 'huge' is not valid"),
    (["bench", "decode", "--size", "tiny", "--arms", "nope"], "unknown arm(s) 'nope'"),
    (["bench", "train", "--size", "tiny", "--arms", "dijiang_convert"], "only leanformer compare trains"),
    (["bench", "attention", "--methods", "flash3"], "unknown method(s) 'flash3'"),
    (["bench", "attention", "--lengths", "512,abc"], "must be comma-separated integers"),
    (["bench", "attention", "--graphs", "--device", "cpu"], "--graphs captures each call as a CUDA graph: it "
                                                            "needs a CUDA device, not cpu"),
    (["bench", "decode", "--size", "tiny", "--contexts", "0"], "must be positive integers"),
    (["bench", "train", "--size", "tiny", "--device", "tpu"], "--device 'tpu' is not valid"),
])
def test_bad_input_exits_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "x").exists()


def test_timer_median_and_iqr():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.q1_ms, t.q3_ms, t.iqr_ms, t.repeats) == (3.0, 2.0, 4.0, 2.0, 5)
    calls = []
    t = timing.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=4)
    assert len(calls) == 6 and t.repeats == 4 and t.median_ms >= 0


def test_memory_meter_counts_saved_tensors_once():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(16, 64)
    meter = memory.MemoryMeter(torch.device("cpu"), saved_tensors=True)
    meter.account([w])
    with meter:
        h = x @ w  # saves x (and w, already accounted)
        y = h.exp()  # saves its output y
        z = (y * y).sum()  # saves y twice: one storage
    assert meter.base_bytes == 64 * 64 * 4
    assert meter.extra_bytes == (x.numel() + y.numel()) * 4
    del z


def test_markdown_table_and_command_line():
    import argparse

    rows = [{"a": 1.23456, "b": None}, {"a": 2.0, "b": "x"}]
    md = report.markdown_table(rows, [report.Column("a", "A", report.fmt_float(2)), report.Column("b", "B")])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1.23 | — |", "| 2.00 | x |"]
    ns = argparse.Namespace(size="tiny", compile=True, peak_flops=None, arms="preln,sas", func=print)
    assert machine.command_line("leanformer bench train", ns) == (
        "leanformer bench train --arms preln,sas --compile --size tiny")


def test_compile_setting_resolves_by_device_and_rejects_bad_values():
    from leanformer.config import ConfigError, TrainConfig
    from leanformer.train.loop import compile_enabled

    assert TrainConfig().compile == "auto"
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))
    with pytest.raises(ConfigError, match="train.compile='yes' is not valid; choose auto, true or false"):
        TrainConfig(compile="yes").validate()


def test_extra_flop_fraction_of_noble_at_gpt2_small():
    """The figure printed beside NOBLE's measurement: 2(d_in r + r² + r d_out) per linear and token, ×3 for
    training, over Pre-LN's 6N + attention."""
    from leanformer.arms import arm_config
    from leanformer.bench.train import SIZES, base_config
    from leanformer.model import TransformerLM

    sz = SIZES["gpt2"]
    with torch.device("meta"):
        pre, noble = (TransformerLM(arm_config(base_config(sz, sz.seq_len), a)) for a in ("preln", "noble_fused"))
    r, C, L = 32, 768, 12
    per_layer = 4 * (C * r + r * r + r * C) + (C * r + r * r + r * 4 * C) + (4 * C * r + r * r + r * C)
    extra = 6 * L * per_layer  # branch matmul parameters (W_down, M, W_up); ω, φ, biases: 6 · (vectors)
    got = noble.flops_per_token(sz.seq_len) - pre.flops_per_token(sz.seq_len)
    vectors = 6 * L * 6 * (r + r + r + r + r + r)  # per linear: b_down, c, ω1, φ1, ω2, φ2 (6 linears)
    assert got == extra + vectors
    assert 0.037 < got / pre.flops_per_token(sz.seq_len) < 0.039  # +3.8% of the training FLOPs


def test_fused_gpu_script_runs_its_sections_on_the_cpu(tmp_path):
    """benchmarks/dijiang_fused_gpu.py --cpu-smoke: the GPU call's sections (layer checks against float64,
    kernel variants, decode) run tiny under Triton's interpreter, so an API drift cannot waste a device call."""
    import json

    pytest.importorskip("triton")
    _run_benchmark_script(tmp_path, "dijiang_fused_gpu.py", "--cpu-smoke", "--sections", "layers,variants,decode",
                          interpret=True)
    result = json.loads((tmp_path / "fused_gpu.json").read_text())
    assert result["checks"] and all(c["pass"] for c in result["checks"])
    variants = result["variants"]
    assert {r["variant"] for r in variants} >= {"default", "first kernel: per-element, Triton's stages"}
    assert all(r["status"] == "ok" for r in variants)
    assert max(r["rel_err_o"] for r in variants) < 1e-5
    assert all((tmp_path / run / "decode.json").is_file() for run in ("decode_graph", "decode_graph_unfused_step"))


def _run_benchmark_script(tmp_path, script: str, *args: str, interpret: bool = False) -> None:
    """Run ``benchmarks/<script> --out tmp_path *args`` in a subprocess (benchmarks/ importable; Triton's
    interpreter with ``interpret``) and fail with its output's tail if it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--out", str(tmp_path), *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_decode_profile_script_runs_on_the_cpu(tmp_path):
    """benchmarks/decode_profile.py --cpu-smoke: the decode-step profile's variants run tiny and eager on the
    CPU and write their kernel tables, so an API drift cannot waste a device call."""
    import json

    _run_benchmark_script(tmp_path, "decode_profile.py", "--cpu-smoke")
    rows = json.loads((tmp_path / "decode_profile.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["kernels_per_step"] > 0 and r["top"] for r in rows)
    assert rows[1]["switches"] == {"leanformer.ops.skinny_linear.TILES": "wide"}  # the first variant with switches
    assert "| variant | step ms |" in (tmp_path / "decode_profile.md").read_text()


def test_prefill_profile_script_runs_on_the_cpu(tmp_path):
    """benchmarks/prefill_profile.py --cpu-smoke: a tiny softmax and DiJiang prefill, eager, and DiJiang's
    compiled by blocks are timed and profiled."""
    import json

    _run_benchmark_script(tmp_path, "prefill_profile.py", "--cpu-smoke")
    rows = json.loads((tmp_path / "prefill_profile.json").read_text())["rows"]
    assert [(r["arm"], r["status"], r["compile_prefill"]) for r in rows] == [
        ("preln", "ok", False), ("dijiang_scratch", "ok", False), ("dijiang_scratch", "ok", "blocks")]
    assert all(r["wall_median_s"] > 0 and r["host_aten_ops"] > 0 and r["top"] for r in rows)
    assert "| variant | wall ms" in (tmp_path / "prefill_profile.md").read_text()


def test_skinny_linear_script_checks_its_kernel_on_the_cpu(tmp_path):
    """benchmarks/skinny_linear_gpu.py --cpu-smoke: the few-row kernel's float64 checks run under Triton's
    interpreter (no timing without CUDA) and the report is written."""
    import json

    pytest.importorskip("triton")
    _run_benchmark_script(tmp_path, "skinny_linear_gpu.py", "--cpu-smoke", interpret=True)
    rows = json.loads((tmp_path / "skinny_linear.json").read_text())["rows"]
    assert rows and all(r["kernel_equal_rounded"] >= 0.99 and r["kernel_rel_err"] < 1e-2 for r in rows)


def test_noble_decode_script_checks_its_variants_on_the_cpu(tmp_path):
    """benchmarks/noble_decode_gpu.py --cpu-smoke: the NOBLE kernel against float64 and each timed variant run once
    under Triton's interpreter, and the report written."""
    import json

    pytest.importorskip("triton")
    _run_benchmark_script(tmp_path, "noble_decode_gpu.py", "--cpu-smoke", interpret=True)
    rows = json.loads((tmp_path / "noble_decode.json").read_text())["rows"]
    assert [(r["M"], r["status"]) for r in rows] == [(1, "ok"), (3, "ok")]
    assert all(r["rel_err"] < 1e-2 for r in rows)  # bf16 against float64
    assert "| NOBLE − plain N+R |" in (tmp_path / "noble_decode.md").read_text()


def test_noble_train_script_checks_its_products_on_the_cpu(tmp_path):
    """benchmarks/noble_train_gpu.py --cpu-smoke: the two-segment product against float64 in both directions, the
    compiled layer by the stacked form and the route (same output), and the tile choice written for train_profile."""
    import json

    pytest.importorskip("triton")
    _run_benchmark_script(tmp_path, "noble_train_gpu.py", "--cpu-smoke", interpret=True)
    result = json.loads((tmp_path / "noble_train.json").read_text())
    assert [r["direction"] for r in result["products"]] == ["forward", "backward dx"]
    assert all(r["best_rel_err"] < 1e-5 for r in result["products"])  # float32 on the CPU against float64
    (layer,) = result["layer"]
    for route in ("noble route", "noble route, separate branch"):
        assert layer[f"{route} rel diff to stacked"] < 1e-5 and f"{route} ms" in layer
    (narrow, wide) = result["branch"]
    assert narrow["width"] == 32 and wide["width"] == 64 and all(f"{k} ms" in wide for k in (
        "cublas x@Wdᵀ", "down_cosnet BK 64, 4 warps, 3 stages", "up_grad_cosnet_bwd BK 64, 4 warps, 3 stages"))
    configs = json.loads((tmp_path / "two_segment_configs.json").read_text())
    # the forward reads Wᵀ (K-contiguous), dx reads W; each with the pointer kernel's and the TMA form's best tiles
    assert set(configs) == {"96,32,64,32,k", "96,64,32,32,n", "96,32,64,32,k+tma", "96,64,32,32,n+tma"}
    assert all(r["tiles"][r["best_tma_tiles"]]["rel_err"] < 1e-5 for r in result["products"])


def test_failure_status_is_one_table_cell():
    """A CUDA error's message spans lines; the row's status must stay one markdown cell."""
    from leanformer.bench.memory import failure_status

    status = failure_status(RuntimeError("CUDA error: capture failed\nSearch for `x`\n| in docs"))
    assert status == "failed: RuntimeError: CUDA error: capture failed Search for `x` / in docs"
    assert failure_status(torch.cuda.OutOfMemoryError("CUDA out of memory.")) == "skipped (memory)"


def test_rows_measured_before_a_stop_are_kept(tmp_path, monkeypatch, capsys):
    """A run stopped before its end (a timeout, Ctrl-C) leaves the rows it measured as JSON lines; a run
    that ends leaves only its report."""
    from leanformer.bench import attention

    real, calls = attention.measure, []

    def stopped_at_second_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(attention, "measure", stopped_at_second_cell)
    out = tmp_path / "attn"
    argv = ["bench", "attention", "--lengths", "32", "--methods", "softmax,shaped", "--heads", "1",
            "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--out", str(out), *CPU]
    assert main(argv) == 130
    assert f"rows measured so far are in {out}/<benchmark>.partial.jsonl" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "attention.partial.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seq_len"], r["status"]) for r in rows] == [("softmax", 32, "ok")]
    assert rows[0]["ms"] > 0 and not (out / "attention.json").exists()
    monkeypatch.setattr(attention, "measure", real)
    assert main(argv) == 0
    assert (out / "attention.json").exists() and not (out / "attention.partial.jsonl").exists()


def test_attention_host_profile_cpu_mode_times_both_paths(tmp_path):
    """benchmarks/attention_host_profile.py --cpu-no-launch: DiJiang's call, direct and through the ops."""
    import json

    pytest.importorskip("triton")
    _run_benchmark_script(tmp_path, "attention_host_profile.py", "--cpu-no-launch", "--methods", "dijiang_fused",
                          "--lengths", "32", "--repeats", "3", interpret=True)
    rows = json.loads((tmp_path / "attention_host_cpu.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["direct", "op"] and all(r["host_us"] > 0 for r in rows)


def test_profiling_scripts_choose_variants_by_label(capsys):
    """--variants of decode_profile.py / prefill_profile.py: semicolon-separated labels (which hold commas), kept in
    the list's order; none asked gives all; an unknown label stops the script naming it and the known ones."""
    import argparse

    from leanformer.bench.variants import chosen_variants

    variants = [("a, compiled", 1), ("b", 2), ("c", 3)]
    parser = argparse.ArgumentParser(prog="profile")
    assert chosen_variants(parser, "c; a, compiled", variants) == [("a, compiled", 1), ("c", 3)]
    assert chosen_variants(parser, "", variants) == variants
    with pytest.raises(SystemExit):
        chosen_variants(parser, "b;nope", variants)
    assert "unknown labels ['nope']" in capsys.readouterr().err


def test_step_copies_names_the_op_that_issued_each_copy_and_the_idle_gaps(tmp_path):
    """benchmarks/step_copies.py: each GPU copy of a (synthetic) trace gets its bytes, time and the innermost
    host op and Python frames around the runtime call with its correlation id; the device's idle gaps, longest
    first, with the activities around each; the script's CPU smoke run writes both tables."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "step_copies.py"
    spec = importlib.util.spec_from_file_location("step_copies", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trace = {"traceEvents": [
        {"cat": "cpu_op", "name": "aten::copy_", "ts": 10, "dur": 5, "tid": 1},
        {"cat": "cpu_op", "name": "Optimizer.step", "ts": 0, "dur": 100, "tid": 1},
        {"cat": "python_function", "name": "torch/optim/adamw.py(10): step", "ts": 0, "dur": 100, "tid": 1},
        {"cat": "python_function", "name": "bench/train.py(5): __call__", "ts": 0, "dur": 120, "tid": 1},
        {"cat": "python_function", "name": "other_thread.py(1): f", "ts": 0, "dur": 90, "tid": 2},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 12, "dur": 1, "tid": 1, "args": {"correlation": 7}},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 50, "dur": 1, "tid": 1, "args": {"correlation": 8}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 200, "dur": 70, "args": {"correlation": 7, "bytes": 4096}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 300, "dur": 9, "args": {"correlation": 8, "bytes": 64}},
        {"cat": "kernel", "name": "gemm", "ts": 400, "dur": 9, "args": {"correlation": 9}},
    ]}
    copies = mod.copies_in_trace(trace)
    frames = "torch/optim/adamw.py(10): step < bench/train.py(5): __call__"  # innermost first, the issuing thread's
    assert copies == [{"name": "Memcpy DtoD", "bytes": 4096, "us": 70, "issued_in": "aten::copy_", "python": frames},
                      {"name": "Memcpy DtoD", "bytes": 64, "us": 9, "issued_in": "Optimizer.step", "python": frames}]
    # the idle gaps between the device's activities, all streams together: a kernel overlapping the first copy
    # (another stream) moves that interval's end to 280
    trace["traceEvents"].append({"cat": "kernel", "name": "k2", "ts": 260, "dur": 20, "args": {}})
    gaps = mod.gaps_in_trace(trace)
    assert (gaps["span_us"], gaps["busy_us"], gaps["idle_us"]) == (209, 98, 111)
    assert gaps["gaps"] == [{"us": 91, "ts": 309, "after": "Memcpy DtoD", "before": "gemm", "issued_in": None,
                             "python": None},
                            {"us": 20, "ts": 280, "after": "k2", "before": "Memcpy DtoD",
                             "issued_in": "Optimizer.step", "python": frames}]
    assert mod.gaps_in_trace({"traceEvents": []})["gaps"] == []
    _run_benchmark_script(tmp_path, "step_copies.py", "--smoke", "--batch", "2")
    md = (tmp_path / "step_copies.md").read_text()
    assert md.startswith("# Copies in one preln step") and "## Idle gaps:" in md
