#!/usr/bin/env bash
# The GPU check on a lent GPU machine (see /work/.library/device): build there, run the whole test suite
# with the CUDA tests, compute-sanitizer over one small case of every kernel, every benchmark at
# the issues' GPU shapes. Logs and results go to $OUT as they are produced, so a run cut short
# still leaves its evidence. Two stages, each well inside one 10-minute device command:
#
#   bash tools/gpu_validate.sh test    # build + pytest (all, CUDA included) + compute-sanitizer
#   bash tools/gpu_validate.sh bench   # every benchmark with --device cuda (reuses the build)
#
# bitsandbytes is not installed there: carry its cp312 manylinux wheel in .whl/ (the device
# README says how) and name .whl in the call's carry list.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fastpeft-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
stage="${1:-test}"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
git log -1 --format='commit %H %ad' >>"$OUT/device.txt" 2>/dev/null || true

if [ ! -f fastpeft/_C*.so ] || [ "$stage" = test ]; then
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build ok"
fi

if [ "$stage" = test ]; then
  # The whole suite: with a GPU visible the CUDA-marked tests run too.
  python3 -m pytest tests -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v "^SKIPPED" | tail -25
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/cuda_smoke.py >"$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer_$tool.log") clean summaries)"
  done
elif [ "$stage" = bench ]; then
  for bench in bench_quant4bit bench_lora bench_ia3 bench_adapter bench_sparse_optim bench_sparse_delta \
               bench_prefix_attention bench_multi_lora; do
    [ -f benchmarks/$bench.py ] || continue
    extra=""
    python3 benchmarks/$bench.py --help 2>/dev/null | grep -q -- --gpu-shapes && extra="--gpu-shapes"
    python3 benchmarks/$bench.py --help 2>/dev/null | grep -q -- --full && extra="--full"
    timeout 240 python3 benchmarks/$bench.py --device cuda $extra >"$OUT/$bench.log" 2>&1
    echo "$bench: exit $?"
  done
  timeout 300 python3 benchmarks/bench_e2e_qlora.py --device cuda --size 1b >"$OUT/bench_e2e_qlora.log" 2>&1
  echo "bench_e2e_qlora: exit $?"
  python3 examples/finetune_minilm.py --method lora --device cuda >"$OUT/finetune_minilm.log" 2>&1
  tar czf "$OUT/results.tar.gz" benchmarks/results
  python3 benchmarks/summarize.py | tee "$OUT/summary.md" | tail -30
fi
