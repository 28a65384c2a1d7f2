#!/usr/bin/env bash
# The GPU checks of this project in one command, for a lent device machine, whose python3 holds CUDA
# torch, lightning, transformers and pytest (not hydra: --noconftest keeps the test file off
# tests/conftest.py). Writes the logs and benchmarks/results-style tables under $OUT (or /tmp).
#
#   bash benchmarks/gpu_checks.sh
#
# 1. tests/test_semi_structured_export.py: the 2:4 export of a GPT-2 on the GPU keeps its logits
#    (and the CPU tests of the same file).
# 2. benchmarks/bench_semi_structured.py: 2:4 against dense on the GPT-2-style model's largest
#    Linear shapes, and that model end to end (semi_structured.md, .json).
# Exits non-zero if either failed; both always run.
set -uo pipefail
out=${OUT:-/tmp/sparsekit-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt" || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$out/gpu.txt" || status=1
"$python" -m pytest -q -p no:cacheprovider --noconftest -rs tests/test_semi_structured_export.py 2>&1 \
    | tee "$out/pytest.log" || status=1
"$python" benchmarks/bench_semi_structured.py --out "$out" 2>&1 | tee "$out/bench.log" || status=1
exit $status
