#!/usr/bin/env bash
# One GPU call: install the carried wheels, run the GPU kernel/model tests (bf16 and fp32 vs float64
# references), then the benchmarks named in $BENCHES; results land in benchmarks/results and are copied to
# $OUT. Usage on the device machine (carry: [".whl"]):  BENCHES="sft medusa" bash benchmarks/gpu_session.sh
# Flags: BENCH_ARGS for every benchmark, or BENCH_ARGS_<name> for one (e.g. BENCH_ARGS_preference_losses=--quick).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; touch /tmp/started
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
fi
for bench in ${BENCHES:-}; do
  own="BENCH_ARGS_$bench"; args="${!own:-${BENCH_ARGS:-}}"
  echo "=== bench_$bench $args"
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_$bench.py $args 2>&1 | tail -40
done
# only what this call wrote (the device tool brings back at most 8 files)
find benchmarks/results -newer /tmp/started -type f \( -name '*.json' -o -name '*.png' \) -exec cp {} "$OUT"/ \;
ls "$OUT"
