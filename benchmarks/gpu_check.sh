#!/usr/bin/env bash
# The whole GPU check in one call of under 8 minutes, from the source tree (nothing is
# installed; the machine needs torch and triton only):
#
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# 1. the environment (GPU, driver, Python, torch, triton) before anything can fail;
# 2. tests/test_attention_triton.py on the GPU (the kernels compiled, not interpreted), when
#    pytest and hypothesis are there (at most 100 s);
# 3. benchmarks/attention_gpu.py: every kind against float64 with poisoned memory, at small
#    shapes and at the timed one; forward + backward time and memory against SDPA flash;
#    GPT-2-small training l1 against dot; the targets marked met or not. Each result is
#    appended to $OUT/attention_gpu.jsonl as it is measured.
# Everything goes to $OUT (default benchmarks/results).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export OUT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{
    echo "== environment ($(date -u +%FT%TZ))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'PYTHON'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton missing:", err)
import truthgpt
print("truthgpt from", truthgpt.__file__)
PYTHON
} 2>&1 | tee "$OUT/environment.txt"

if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    echo "== tests/test_attention_triton.py on the GPU"
    timeout 100 "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" \
        tests/test_attention_triton.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
else
    echo "== tests skipped: pytest or hypothesis missing" | tee "$OUT/tests.txt"
fi

echo "== benchmarks/attention_gpu.py"
timeout 330 "$PY" benchmarks/attention_gpu.py --out "$OUT" 2>&1 | tee "$OUT/attention_gpu.log"
echo "== done ($(date -u +%FT%TZ)); results in $OUT"
