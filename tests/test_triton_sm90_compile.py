"""Our Triton kernels compile for an H100/H200 (sm_90) as Inductor compiles them, on a CPU-only machine.

The interpreter tests (TRITON_INTERPRET=1) run the kernels' arithmetic but not Triton's type checks and code
generation for a GPU; a kernel that runs there can still fail to compile on the GPU, and under
``torch.compile`` Inductor declares Python floats fp64 (the fused decoding step failed so on an H200,
2026-12-04: docs/gpu/decode_2026-12-04/compile_debug_call5.txt). tests/_compile_sm90.py compiles every
kernel down to a cubin for sm_90, with float arguments fp32 and fp64, in a subprocess without the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_with_inductors_argument_types():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # an older or newer Triton without this API: nothing to check with
        pytest.skip(f"this Triton has no ASTSource/GPUTarget API ({e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    shards = max(1, min(4, os.cpu_count() or 1))  # one process per core: ~200 s of compiling on one CI core
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_compile_sm90.py"), str(i), str(shards)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    outputs = [p.communicate(timeout=600) for p in procs]  # (stdout, stderr) each; sets returncode
    stdout = "".join(out for out, _ in outputs)
    everything = stdout + "".join(err for _, err in outputs)
    if "OK " not in stdout and "FAIL " not in stdout:
        pytest.fail(f"tests/_compile_sm90.py did not run:\n{everything[-3000:]}")
    fails = [line for line in stdout.splitlines() if line.startswith("FAIL")]
    assert not fails and all(p.returncode == 0 for p in procs), "\n".join(fails) or everything[-3000:]
    assert stdout.count("OK ") == 80
