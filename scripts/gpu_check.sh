#!/usr/bin/env bash
# The GPU checklist of ../shared/GPU.md, for a session lent a GPU (the device tool's `run`, which
# allows 10 minutes a command and about 30 a session): one stage per call, logs under $OUT.
#
#   scripts/gpu_check.sh tests     # the suite with the kernels on (MINIVLM_KERNELS=1), then off
#   scripts/gpu_check.sh kernels   # bench kernels in bf16 and fp16, and the compile test's table
#   scripts/gpu_check.sh generate  # bench generate, interleave-0.5b bf16, eager and --compile
#
# The device has no network: minivlm is installed from this tree without dependencies, over the
# image's torch, triton and transformers. Figures go into BENCHMARKS.md with this command line.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
stage=${1:?"stage: tests, kernels or generate"}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/versions.txt" 2>&1
python -c "import minivlm.kernels" 2>/dev/null || pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.txt" 2>&1
python -c "import minivlm.kernels" 2>/dev/null || ln -sfn ../kernels minivlm/kernels  # no setuptools: the package-dir by hand

case "$stage" in
tests)
  MINIVLM_KERNELS=1 timeout 280 python -m pytest -q -p no:cacheprovider > "$OUT/tests_kernels_on.txt" 2>&1
  MINIVLM_KERNELS=0 timeout 280 python -m pytest -q -p no:cacheprovider > "$OUT/tests_kernels_off.txt" 2>&1
  tail -3 "$OUT"/tests_*.txt
  ;;
kernels)
  for d in bfloat16 float16; do
    timeout 200 python -m minivlm bench kernels --dtype $d > "$OUT/bench_kernels_$d.txt" 2>&1
  done
  TRITON_DEFAULT_FP_FUSION=1 timeout 150 python tests/test_kernels_compile.py > "$OUT/compile.txt" 2>&1
  tail -n 40 "$OUT"/bench_kernels_*.txt; tail -1 "$OUT/compile.txt"
  ;;
generate)
  for c in "" "--compile"; do
    timeout 280 python -m minivlm bench generate --preset interleave-0.5b --dtype bfloat16 --device cuda \
      --new-tokens 128 --repeats 5 $c > "$OUT/bench_generate$c.txt" 2>&1
  done
  tail -n 20 "$OUT"/bench_generate*.txt
  ;;
*)
  echo "unknown stage $stage: tests, kernels or generate" >&2
  exit 2
  ;;
esac
