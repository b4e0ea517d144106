#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and PyTorch + Triton already installed
# (no network needed): the GPU tests (tests/test_gpu.py: Triton kernels compiled for the GPU against
# eager CUDA, whole-model training with fusion), then benchmarks/bench_fusion.py --device cuda.
# dsc is put on PYTHONPATH from this checkout (no pip); wheels in .whl/ (e.g. pydantic, where the
# machine lacks it) are installed into /tmp/site first. Logs go to $OUT (default /tmp/dsc_gpu).
#
#     bash benchmarks/gpu_check.sh [quick|tests]   # quick: fewer shapes; tests: no benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dsc_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package layout of pyproject.toml's package-dir, as links: compiler/ is dsc, passes/ dsc.passes, ...
PKG=/tmp/dsc_pkg
rm -rf "$PKG" && mkdir -p "$PKG/dsc"
for f in compiler/*; do ln -s "$PWD/$f" "$PKG/dsc/"; done
for d in passes codegen runtime schemas; do ln -s "$PWD/$d" "$PKG/dsc/$d"; done
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH} DSC_CACHE_DIR=/tmp/dsc_cache

python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton, pydantic, dsc
print("torch", torch.__version__, "triton", triton.__version__, "pydantic", pydantic.__version__)
print("device", torch.cuda.get_device_name(), "dsc from", dsc.__file__)
EOF
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt"
tests_rc=${PIPESTATUS[0]}
if [ "${1:-}" = tests ]; then
    exit "$tests_rc"
fi
if [ "${1:-}" = quick ]; then
    shapes=8192x1024,4096x4096; reps=10
else
    shapes=8192x1024,4096x4096,16384x4096; reps=20
fi
timeout 300 python3 benchmarks/bench_fusion.py --device cuda --shapes "$shapes" --reps "$reps" \
    --block gpt --block-batch 16 --block-seq 512 2>&1 | tee "$OUT/bench_fusion_cuda.txt"
timeout 150 python3 benchmarks/bench_fusion.py --device cuda --patterns "" --dtypes fp32,bf16 --reps "$reps" \
    --block llama --block-batch 16 --block-seq 512 2>&1 | tee "$OUT/bench_block_llama_cuda.txt"
echo "tests rc=$tests_rc"
exit "$tests_rc"
