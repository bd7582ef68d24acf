#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (a GPU machine whose python3 has torch):
# tests/system/test_gpu.py, then the model, engine and session benchmarks on the GPU. Logs go to $OUT
# (default ./gpu-out).
# Packages the machine lacks can come as wheels in .whl/ (installed into /tmp/site).
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
rc=0
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts=-ra \
  tests/system/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" || rc=1
timeout 120 python3 -m bench.models --device cuda --repeats 5 --sequences 256 2>&1 \
  | tee "$OUT/bench-models.log" || rc=1
timeout 150 python3 -m bench.engine --device cuda --rounds 3 --sequences 512 2>&1 \
  | tee "$OUT/bench-engine.log" || rc=1
timeout 120 python3 bench/sessions.py --device cuda 2>&1 | tee "$OUT/bench-sessions.log" || rc=1
exit $rc
