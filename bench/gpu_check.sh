#!/usr/bin/env bash
# The GPU check: everything the CPU machine cannot verify, in one run on one GPU (aim: under 8 minutes).
#
#   bash bench/gpu_check.sh                 # results in bench/results/<date>-<device>/
#   RESULTS_DIR=/some/dir bash bench/gpu_check.sh
#
# 1. makes mae_fast importable without network (editable install, or a symlinked package tree);
#    wheels in .whl/ (for example transformers, for the Hugging Face baseline) are installed offline;
# 2. builds the CUDA extension when the repository has one (csrc/*.cu);
# 3. runs the whole test suite natively on the GPU (compiled Triton, SDPA/FlashAttention, bf16 steps,
#    DALI mixed decoding when DALI is installed);
# 4. runs the benchmarks at the real MAE shapes (ViT-B/16 and ViT-L/16; set BENCH_FILTER to change);
# 5. prints the summary table last and writes it, the logs and the raw JSON to the results folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'no_gpu')")
RESULTS_DIR=${RESULTS_DIR:-bench/results/$(date +%Y-%m-%d)-$device}
mkdir -p "$RESULTS_DIR"
status=0
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/mae_fast_site .whl/*.whl \
    && export PYTHONPATH=/tmp/mae_fast_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! MAE_FAST_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$RESULTS_DIR/install.log" 2>&1; then
  log "editable install failed (see install.log); using a symlinked package tree"
  site=$(mktemp -d); mkdir -p "$site/mae_fast"
  for f in mae_fast/*; do ln -s "$PWD/$f" "$site/mae_fast/"; done
  ln -s "$PWD/kernels" "$site/mae_fast/kernels"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import mae_fast.kernels, mae_fast; print('mae_fast from', mae_fast.__file__)" || exit 1

if ls csrc/*.cu >/dev/null 2>&1; then
  log "building the CUDA extension"
  MAE_FAST_FORCE_CUDA_BUILD=1 $PY setup.py build_ext --inplace >"$RESULTS_DIR/build.log" 2>&1 || { log "CUDA build FAILED"; status=1; }
else
  log "no CUDA sources in csrc/: nothing to build"
fi

log "tests"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest tests -q -p no:cacheprovider -o addopts="" \
  --junitxml="$RESULTS_DIR/tests.xml" >"$RESULTS_DIR/tests.log" 2>&1 || status=1
tail -n 5 "$RESULTS_DIR/tests.log"

log "benchmarks"
timeout ${BENCH_TIMEOUT:-240} $PY -m pytest bench -q -p no:cacheprovider -k "${BENCH_FILTER:-not vit_h14}" \
  --benchmark-json="$RESULTS_DIR/bench.json" --benchmark-columns=median,rounds >"$RESULTS_DIR/bench.log" 2>&1 || status=1
tail -n 3 "$RESULTS_DIR/bench.log"

if [ -s "$RESULTS_DIR/bench.json" ]; then
  $PY bench/summarize.py "$RESULTS_DIR/bench.json" | tee "$RESULTS_DIR/summary.md"
fi
exit $status
