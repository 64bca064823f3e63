#!/usr/bin/env bash
# One 10-minute GPU call that checks correctness and measures everything (issue 8):
#   bash benchmarks/gpu.sh                          # on the GPU machine (python3 + torch + triton there)
#   CUDA_VISIBLE_DEVICES= bash benchmarks/gpu.sh --cpu-smoke   # the same code, tiny, on CPU (tests the script)
# Extra arguments go to benchmarks/gpu_check.py (--budget SECONDS, default 560; --no-compile: eager training arms).
# Its correctness section runs tests/test_device_equivalence.py under pytest (on CPU and CUDA): pytest must be
# importable by $PYTHON there (else those checks are reported as SKIP).
# The training sections (issue 13) run compiled: GPT-2 small Pre-LN/NOBLE/SAS-P/no-norm, then the crammed-BERT
# shape; most of their ~5 minutes is compilation. The profile with top kernels: benchmarks/train_profile.py.
# Outputs under $OUT (default ./bench_out): gpu_check.json, gpu_check.md, train.png, attention.png,
# decode.png, log.txt. fla wheels carried in .whl/ are installed into /tmp/site first (no network).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
case " $* " in
  *" --cpu-smoke "*)
    # here (not on the GPU machine) the project's venv has torch; python3 may not
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi ;;
  *)
    if compgen -G ".whl/*.whl" > /dev/null; then
      echo "installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/site"
      if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
      else
        echo "wheel install failed: continuing without fla"
      fi
    fi ;;
esac
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PY" -u benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
