"""Compile leanformer's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, as Inductor
compiles them inside a ``torch.compile``d graph: Python float arguments declared fp64, integers i64.

Run by tests/test_triton_sm90_compile.py in a subprocess without ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` makes interpreted functions, which cannot be compiled). Prints one line per kernel,
``OK name`` or ``FAIL name: error``, and exits 1 on any failure. ``python tests/_compile_sm90.py i n`` compiles
only every n-th kernel from the i-th (one process per core). Triton's code generation down to a cubin
needs no GPU (its bundled ptxas runs on the CPU): type errors such as a loop-carried variable that changes
type (found on an H200, 2026-12-04) show up here.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from leanformer.ops import _cosnet_kernels as cosnet
from leanformer.ops import _cross_entropy_kernel as cross_entropy
from leanformer.ops import _feature_map_kernels as features
from leanformer.ops import _fused_decay_kernels as attn
from leanformer.ops import _fused_decay_step_kernel as step
from leanformer.ops import _linear_argmax_kernel as head_argmax
from leanformer.ops import _noble_branch_kernels as noble_branch
from leanformer.ops import _noble_decode_kernel as noble_decode
from leanformer.ops import _shaped_mix_kernels as shaped_mix
from leanformer.ops import _skinny_linear_kernel as skinny
from leanformer.ops import _two_segment_matmul_kernel as two_segment
from leanformer.ops.two_segment_matmul import CANDIDATES as TWO_SEGMENT_TILES
from leanformer.ops.two_segment_matmul import fit_shared_memory

TARGET = GPUTarget("cuda", 90, 32)


SHARED_MEMORY = 232_448  # bytes a block may use on an H100 (sm_90)


def compile_kernel(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, float_type: str):
    """Every argument of ``fn``: a pointer type from ``pointers``, ``float_type`` for ``floats``, a constexpr
    value from ``constexprs``, else i64 (how Inductor declares a Python int it cannot specialise). ``constexprs``
    may carry ``num_stages`` and ``num_warps`` (the launch's pipeline depth and warps, options rather than
    arguments), ``expect_ttgir`` (operation names its TTGIR must contain) and ``divisible``:
    the arguments a launch hints as multiples of 16 (with them Triton pipelines the loads, as at run time); the
    compiled kernel must fit in SHARED_MEMORY."""
    constexprs = dict(constexprs)
    options = {key: constexprs.pop(key) for key in ("num_stages", "num_warps") if key in constexprs}
    divisible = constexprs.pop("divisible", ())
    expect_ttgir = constexprs.pop("expect_ttgir", ())
    expect_loops = constexprs.pop("expect_loops", None)
    names = fn.arg_names
    sig = {}
    for n in names:
        sig[n] = (pointers.get(n) or (float_type if n in floats else None)
                  or ("constexpr" if n in constexprs else "i64"))
    src = ASTSource(fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    kernel = triton.compile(src, target=TARGET, options=options)
    missing = [op for op in expect_ttgir if op not in kernel.asm["ttgir"]]
    if missing:
        raise RuntimeError(f"its TTGIR lacks {missing}")
    if expect_loops is not None and kernel.asm["ttgir"].count("scf.for") != expect_loops:
        raise RuntimeError(f"its TTGIR has {kernel.asm['ttgir'].count('scf.for')} loops, not {expect_loops}")
    if kernel.metadata.shared > SHARED_MEMORY:
        raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory; an H100 block has {SHARED_MEMORY}")


def cases():
    bf, f32 = "*bf16", "*fp32"
    attn_ptr = {"Q": bf, "K": bf, "V": bf, "LG": f32, "N": f32, "O": bf, "DO": bf, "DK": bf, "DV": bf}
    for factored in (True, False):
        meta = dict(M=64, D=64, BLOCK_M=64, BLOCK_N=64, HAS_NORM=True, PRECISION="tf32", INTERPRET=False,
                    T_END=0, FACTORED=factored, SCALE_OPERAND=True, FULL_LOOPS=False, REVERSE=True)
        yield f"fused attention forward (factored={factored})", attn.fwd_kernel, attn_ptr, (), meta
        yield f"fused attention dK/dV (factored={factored})", attn.bwd_dkdv_kernel, attn_ptr, (), meta
    step_ptr = {"Q": bf, "K": bf, "V": bf, "P": f32, "LD": f32, "LG": f32, "S": f32, "N": f32, "W": f32,
                "GB": f32, "O": bf, "COS": bf, "SIN": bf, "POS": "*i64", "G": bf}
    floats = ("in_scale", "eps", "log_eps")
    for paper in (True, False):
        for logit in (False, True):
            meta = dict(M=64, D=64, BLOCK_F=64, PAPER=paper, DECAY_LOGIT=logit, HAS_EPS=True, ROPE=False, R=0,
                        POS_PTR=False, GATE=False, Y_ROUND=0, SINGLE=False, PDL=False)
            yield f"decoding step (paper={paper}, decay logit={logit})", step.step_kernel, step_ptr, floats, meta
    for rotary, pos_ptr in ((64, True), (32, False)):  # RoPE in the kernel: full at a device position, partial
        meta = dict(M=64, D=64, BLOCK_F=64, PAPER=True, DECAY_LOGIT=False, HAS_EPS=True, ROPE=True, R=rotary,
                    POS_PTR=pos_ptr, GATE=False, Y_ROUND=0, SINGLE=False, PDL=False)
        yield (f"decoding step with RoPE (R={rotary}, position pointer={pos_ptr})", step.step_kernel, step_ptr,
               floats, meta)
    for y_round, out in ((1, bf), (0, f32)):  # the output gate in the epilogue: a bf16 copy; float32 residuals
        meta = dict(M=64, D=64, BLOCK_F=64, PAPER=True, DECAY_LOGIT=False, HAS_EPS=True, ROPE=True, R=64,
                    POS_PTR=True, GATE=True, Y_ROUND=y_round, SINGLE=False, PDL=False)
        yield (f"decoding step with the gate (Y_ROUND={y_round})", step.step_kernel, dict(step_ptr, O=out), floats,
               meta)
    for paper in (True, False):  # the single-pass form (fused_decay_step.SINGLE_PASS), as the GPT-2 copy runs it
        meta = dict(M=64, D=64, BLOCK_F=64, PAPER=paper, DECAY_LOGIT=False, HAS_EPS=True, ROPE=True, R=64,
                    POS_PTR=True, GATE=True, Y_ROUND=1, SINGLE=True, PDL=not paper)
        yield (f"decoding step, single pass (paper={paper}, PDL={not paper})", step.step_kernel, step_ptr, floats,
               meta)

    for x_type, split in (("*bf16", False), ("*fp32", True)):
        feat_ptr = {"x_ptr": x_type, "p_ptr": f32, "logd_ptr": f32, "shift_ptr": f32, "f_ptr": bf,
                    "rowmax_ptr": f32, "df_ptr": bf, "dx_ptr": x_type, "dlogd_ptr": f32}
        base = dict(D=64, M=64, BLOCK_T=64, IN_SCALE=64 ** -0.25, HAS_LOG_D=True, SPLIT_X=split, INTERPRET=False)
        for mode in (0, 1, 2, 3) if not split else (0,):
            yield f"feature map forward (mode {mode}, x {x_type})", features.features_fwd_kernel, feat_ptr, (), \
                dict(base, MODE=mode)
        for softmax in (False, True) if not split else (False,):
            yield f"feature map backward (softmax={softmax}, x {x_type})", features.features_bwd_kernel, \
                feat_ptr, (), dict(base, SOFTMAX=softmax)

    yield "cross-entropy loss terms and gradient, in place (bf16 logits, GPT-2's vocabulary block)", \
        cross_entropy.cross_entropy_grad_kernel, dict(L=bf, T="*i64", INV_N=f32, G=bf, LOSS=f32), (), \
        dict(IGNORE=-100, BLOCK_V=4096)
    params = {name: f32 for name in ("W1", "P1", "M", "C", "W2", "P2", "PART")}
    cos_ptr = dict(params, Z=bf, S=bf, DS=bf, DZ=bf)
    yield "CosNet forward (bf16 z, r 32)", cosnet.cosnet_fwd_kernel, cos_ptr, (), dict(R=32, BLOCK_N=128)
    yield "CosNet backward (bf16 z, r 32)", cosnet.cosnet_bwd_kernel, cos_ptr, (), dict(R=32, BLOCK_N=128)
    half_params = dict(cos_ptr, **{name: bf for name in ("W1", "P1", "M", "C", "W2", "P2")})
    yield "CosNet forward (bf16 z and parameters, r 32)", cosnet.cosnet_fwd_kernel, half_params, (), \
        dict(R=32, BLOCK_N=128)
    for bias, even, block_m, block_n, out, act, pdl in ((True, True, 16, 16, bf, 1, False),
                                                        (False, False, 32, 64, f32, 0, False),
                                                        (True, True, 16, 32, bf, 2, False),
                                                        (True, True, 16, 16, bf, 1, True)):
        io = bf if out == bf else f32
        ptrs = dict(X=io, LNW=io, LNB=io, W=io, Bias=io, RES=out, Y=out)
        meta = dict(LN=False, LN_BIAS=False, HAS_BIAS=bias, HAS_RES=False, BLOCK_M=block_m, BLOCK_N=block_n,
                    BLOCK_K=256, EVEN_K=even, INTERPRET=False, ACT=act, PDL=pdl)
        yield (f"few-row linear ({out[1:]}, bias={bias}, even K={even}, BLOCK_M={block_m}, ACT={act}, PDL={pdl})",
               skinny.skinny_linear_kernel, ptrs, ("eps",), meta)
    fma_meta = dict(LN=True, LN_BIAS=True, HAS_BIAS=True, HAS_RES=True, BLOCK_M=8, BLOCK_N=8, BLOCK_K=128,
                    EVEN_K=True, INTERPRET=False, ACT=1, PDL=False, FMA=True)
    yield "few-row linear by multiply-adds (bf16, 8 rows, 8 columns)", skinny.skinny_linear_kernel, \
        {name: bf for name in ("X", "LNW", "LNB", "W", "Bias", "RES", "Y")}, ("eps",), fma_meta
    nl_ptrs = {name: bf for name in ("X", "LNW", "LNB", "W", "Bias", "RES", "Y")}
    yield "few-row linear with LayerNorm prologue and residual epilogue (bf16)", skinny.skinny_linear_kernel, \
        nl_ptrs, ("eps",), dict(LN=True, LN_BIAS=True, HAS_BIAS=True, HAS_RES=True, BLOCK_M=16, BLOCK_N=16,
                                BLOCK_K=256, EVEN_K=True, INTERPRET=False, ACT=1, PDL=False)
    yield "head product and column-block argmax (bf16)", head_argmax.linear_argmax_kernel, \
        dict(X=bf, W=bf, Bias=bf, Y=bf, PMAX=f32, PIDX="*i32"), (), \
        dict(HAS_BIAS=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, EVEN_K=True, INTERPRET=False)
    noble_ptrs = {name: bf for name in ("X", "W", "Bias", "WD", "BD", "W1", "P1", "MM", "C", "W2", "P2", "WU", "Y")}
    for prefetch in (False, True):
        meta = dict(HAS_BIAS=True, R=32, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, EVEN_K=True, INTERPRET=False,
                    PREFETCH=prefetch, ACT=1 if prefetch else 0, COS_PRECISION="tf32" if prefetch else "ieee")
        yield f"NOBLE decoding layer (bf16, r 32, prefetch, GELU and tf32 CosNet={prefetch})", \
            noble_decode.noble_decode_kernel, \
            noble_ptrs, (), meta
        yield f"NOBLE decoding layers grouped (bf16, r 32, prefetch, GELU and tf32 CosNet={prefetch})", \
            noble_decode.noble_decode_grouped_kernel, dict(noble_ptrs, OFFS="*i32"), (), meta
    # as launched: unit strides along K specialised to 1 (so the K loop is pipelined) and launch_config's stages
    # for its widest tiles at 32 rows (a kernel with two K loops needed twice the budget: a review, 2026-12-07)
    yield "NOBLE decoding layer split along K: partials (bf16, r 32, 32 rows, 4 stages)", \
        noble_decode.noble_partials_kernel, dict(X=bf, W=bf, WD=bf, P=f32), (), \
        dict(R=32, BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, EVEN_K=True, INTERPRET=False, sxk=1, swk=1, spn=1,
             num_stages=4, divisible=("X", "W", "WD", "P", "sxm", "swn", "sdr", "sps", "spm", "K", "K_SPLIT", "N"))
    yield "NOBLE decoding layer split along K: finish (bf16, r 32, GELU, tf32 CosNet)", \
        noble_decode.noble_finish_kernel, \
        dict(P=f32, **{name: bf for name in ("Bias", "BD", "W1", "P1", "MM", "C", "W2", "P2", "WU", "Y")}), (), \
        dict(HAS_BIAS=True, R=32, BLOCK_M=16, BLOCK_N=16, INTERPRET=False, ACT=1, COS_PRECISION="tf32")
    yield "NOBLE decoding layers, shared z (bf16, r 32, GELU)", noble_decode.noble_decode_shared_kernel, \
        dict(noble_ptrs, OFFS="*i32", Z=bf, SYNC="*i32"), (), \
        dict(HAS_BIAS=True, R=32, RZ=16, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, EVEN_K=True, INTERPRET=False, ACT=1,
             COS_PRECISION="ieee")
    # NOBLE's training products as launched: bf16, unit strides along K (x, dy, s, dz: sa1k = sa2k = 1; Wᵀ as
    # B1 in the forward: sb1k = 1), the candidate tile shapes whose pipelined tiles hold ≥ 128 KiB
    seg_ptrs = dict(A1=bf, B1=bf, A2=bf, B2=bf, Bias=bf, C=bf)
    # (each of the largest: (BM + BN) BK stages ≥ 64K elements; one loop or two); the TTGIR must show wgmma fed by
    # asynchronous copies (a matrix kernel without them is on a slower path)
    wgmma = ("warp_group_dot", "async_copy_global_to_local")
    for bm, bn, bk, group, warps, stages in (t for t in TWO_SEGMENT_TILES if (t[0] + t[1]) * t[2] * t[5] >= 65536):
        for one_loop in (False, True) if stages == 4 and bn == 256 else (False,):  # one loop: the largest tiles
            yield (f"two-segment product (bf16, {bm}x{bn}x{bk}, {warps} warps, {stages} stages, one loop={one_loop})",
                   two_segment.two_segment_matmul_kernel, seg_ptrs, (),
                   dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_K2=32, GROUP_M=group, EVEN_K=True,
                        EVEN_K2=True, EVEN_N=True, ONE_LOOP=one_loop, PRECISION="tf32", INTERPRET=False, sa1k=1, sb1k=1,
                        sa2k=1, sb2k=1, scn=1, num_warps=warps, num_stages=stages, expect_ttgir=wgmma,
                        expect_loops=1 if one_loop else 2,
                        divisible=("A1", "B1", "A2", "B2", "Bias", "C", "M", "N", "K1", "K2", "sa1m", "sb1n", "sa2m",
                                   "sb2n", "scm")))
    # one loop in the backward's layout (W as B1, N-contiguous) at cuBLAS's tile: one pipelined loop in the TTGIR
    yield ("two-segment product, one loop, backward layout (bf16, 256x128x64, 4 stages)",
           two_segment.two_segment_matmul_kernel, seg_ptrs, (),
           dict(HAS_BIAS=False, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, BLOCK_K2=32, GROUP_M=8, EVEN_K=True,
                EVEN_K2=True, EVEN_N=True, ONE_LOOP=True, PRECISION="tf32", INTERPRET=False, sa1k=1, sb1n=1, sa2k=1,
                sb2n=1, scn=1, num_warps=8, num_stages=4, expect_ttgir=wgmma, expect_loops=1,
                divisible=("A1", "B1", "A2", "B2", "C", "M", "N", "K1", "K2", "sa1m", "sb1k", "sa2m", "sb2k", "scm")))
    # float32 operands with TF32 (training without autocast): the default tile fitted to shared memory as launched
    fp32_tile = fit_shared_memory((*TWO_SEGMENT_TILES[0], False), 4)
    yield (f"two-segment product (float32, TF32, {'x'.join(map(str, fp32_tile[:3]))}, {fp32_tile[5]} stages)",
           two_segment.two_segment_matmul_kernel, {name: "*fp32" for name in seg_ptrs}, (),
           dict(HAS_BIAS=True, BLOCK_M=fp32_tile[0], BLOCK_N=fp32_tile[1], BLOCK_K=fp32_tile[2], BLOCK_K2=32,
                GROUP_M=8, EVEN_K=True, EVEN_K2=True, EVEN_N=True, ONE_LOOP=False, PRECISION="tf32", INTERPRET=False,
                sa1k=1, sb1k=1, sa2k=1, sb2k=1, scn=1, num_warps=fp32_tile[4], num_stages=fp32_tile[5],
                divisible=("A1", "B1", "A2", "B2", "Bias", "C", "M", "N", "K1", "K2", "sa1m", "sb1n", "sa2m", "sb2n",
                           "scm")))
    yield ("two-segment product, backward layout (bf16, W as B1, ragged K2)", two_segment.two_segment_matmul_kernel,
           seg_ptrs, (), dict(HAS_BIAS=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_K2=32, GROUP_M=8,
                              EVEN_K=True, EVEN_K2=False, EVEN_N=False, ONE_LOOP=False, PRECISION="tf32",
                              INTERPRET=False, sa1k=1, sb1n=1, sa2k=1, sb2n=1, scn=1, num_warps=8, num_stages=3,
                              expect_ttgir=wgmma, divisible=("A1", "B1", "A2", "B2", "C", "M", "N", "K1", "sa1m",
                                                             "sb1k", "sa2m", "sb2k", "scm")))
    for nk, (bm, bn) in ((True, (128, 256)), (False, (256, 128))):  # the TMA form: forward and backward layouts
        def desc(rows, cols):
            return f"tensordesc<bf16[{rows},{cols}]>"

        tma_ptrs = dict(a1_desc=desc(bm, 64), b1_desc=desc(bn, 64) if nk else desc(64, bn), a2_desc=desc(bm, 32),
                        b2_desc=desc(bn, 32) if nk else desc(32, bn), Bias=bf, C=bf, c_desc=desc(bm, bn))
        yield (f"two-segment product by TMA (bf16, {bm}x{bn}x64, 3 stages, B stored transposed={nk})",
               two_segment.two_segment_tma_kernel, tma_ptrs, (),
               dict(HAS_BIAS=nk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, BLOCK_K2=32, GROUP_M=8, B1_NK=nk, B2_NK=nk,
                    PRECISION="tf32", INTERPRET=False, num_warps=8, num_stages=3, expect_loops=2,
                    expect_ttgir=("warp_group_dot", "async_tma_copy_global_to_local",
                                  "async_tma_copy_local_to_global")))
    yield ("two-segment product by TMA, persistent (bf16, 128x256x64, 3 stages, B stored transposed)",
           two_segment.two_segment_tma_persistent_kernel,
           dict(a1_desc=desc(128, 64), b1_desc=desc(256, 64), a2_desc=desc(128, 32), b2_desc=desc(256, 32), Bias=bf,
                C=bf, c_desc=desc(128, 256)), (),
           dict(HAS_BIAS=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, BLOCK_K2=32, GROUP_M=8, B1_NK=True, B2_NK=True,
                PRECISION="tf32", INTERPRET=False, num_warps=8, num_stages=3, expect_loops=3,
                expect_ttgir=("warp_group_dot", "async_tma_copy_global_to_local", "async_tma_copy_local_to_global")))
    branch_meta = dict(R=32, BLOCK_N=32, BLOCK_K=64, EVEN_K=True, PRECISION="tf32", INTERPRET=False, num_warps=4,
                       num_stages=3)
    yield "NOBLE training: down product and CosNet (bf16 x, r 32)", noble_branch.down_cosnet_kernel, \
        dict(params, X=bf, WD=bf, BD=bf, Z=bf, S=bf), (), dict(branch_meta, sxk=1, swk=1)
    yield "NOBLE training: up product's gradient and CosNet's backward (bf16 dy, r 32)", \
        noble_branch.up_grad_cosnet_bwd_kernel, dict(params, DY=bf, WU=bf, Z=bf, DZ=bf), (), \
        dict(branch_meta, sdk=1, swr=1)
    mix_ptrs = dict(V=bf, S=bf, DOUT=bf, ALPHA=f32, BETA=f32, GAMMA=f32, OUT=bf, DV=bf, DS=bf, PART=f32,
                    CARRY=f32, X=bf, SUMS=f32)
    for carry in (False, True):
        meta = dict(BLOCK_T=64, BLOCK_D=32, HAS_CARRY=carry)
        yield (f"shaped-attention mix forward (bf16, D 64, carry={carry})", shaped_mix.shaped_mix_fwd_kernel,
               mix_ptrs, (), meta)
        yield (f"shaped-attention mix backward (bf16, D 64, carry={carry})", shaped_mix.shaped_mix_bwd_kernel,
               mix_ptrs, (), meta)
    mixed = dict(mix_ptrs, V=f32, OUT=f32, DV=f32, DOUT=f32)  # SAS under autocast: float32 values, bf16 SDPA
    yield ("shaped-attention mix forward (float32 v, bf16 s)", shaped_mix.shaped_mix_fwd_kernel, mixed, (),
           dict(BLOCK_T=64, BLOCK_D=32, HAS_CARRY=True))
    yield ("shaped-attention mix backward (float32 v, bf16 s)", shaped_mix.shaped_mix_bwd_kernel, mixed, (),
           dict(BLOCK_T=64, BLOCK_D=32, HAS_CARRY=True))
    yield ("shaped-attention mix chunk sums (float32)", shaped_mix.chunk_sums_kernel, dict(mixed, X=f32), (),
           dict(BLOCK_T=64, BLOCK_D=32, PER_POSITION=False))
    for per_position in (False, True):
        yield (f"shaped-attention mix chunk sums (per position={per_position})", shaped_mix.chunk_sums_kernel,
               mix_ptrs, (), dict(BLOCK_T=64, BLOCK_D=32, PER_POSITION=per_position))


def main(shard: int = 0, shards: int = 1) -> int:
    """Compile the jobs ``shard``, ``shard + shards``, … of the list (the test runs one process per core)."""
    failed = 0
    jobs = [(case, float_type) for case in cases() for float_type in (("fp32", "fp64") if case[3] else ("",))]
    for (name, fn, ptrs, floats, meta), float_type in jobs[shard::shards]:
        label = f"{name}, floats {float_type}" if floats else name
        try:
            compile_kernel(fn, ptrs, floats, meta, float_type)
            print(f"OK {label}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel's failure, then exit 1
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[-300:]}", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))  # optional: shard index, shard count
