#!/usr/bin/env bash
# The GPU check: everything the CPU machine cannot verify, in one run on one GPU (aim: under 8 minutes).
#
#   bash bench/gpu_check.sh                 # results in bench/results/<date>-<device>/
#   RESULTS_DIR=/some/dir RESULTS_ARCHIVE=/some/results.tgz bash bench/gpu_check.sh
#
# 1. builds the CUDA extension for this GPU's architecture only (csrc/*.cu; MAE_FAST_CUDA_ARCHS overrides);
#    wheels in an ignored .whl/ folder, if any, are installed offline first;
# 2. makes mae_fast importable without network (editable install, or a symlinked package tree);
# 3. runs the benchmarks at the real MAE shapes: the training step, the loss, the data loaders (the only
#    measure of the shard loader's GPU aim, so before the limit can cut it off), then the other ops
#    (BENCH_FILES changes the files; ViT-B/16 and ViT-L/16; the compiled-reference provider only
#    for the loss's forward+backward, which its target names; set BENCH_FILTER to change), each result also
#    appended to bench_partial.jsonl as it finishes, the run saved as a pytest-benchmark baseline
#    (<machine>/0001_gpu_check.json, for --benchmark-compare later);
# 4. runs the whole test suite natively on the GPU (compiled Triton, CUDA ops, SDPA/FlashAttention, bf16
#    steps, DALI mixed decoding when DALI is installed), on several workers when pytest-xdist is there;
# 5. runs the real trainer for 60 steps (ViT-B/16, batch 256, blocks compiled, synthetic images; TRAIN_FLAGS
#    and TRAIN_STEPS change that) and keeps its log lines (images/s, MFU, peak memory);
# 6. prints the summary last and writes it, the logs and the raw results to the results folder.
#
# Time: each phase has a limit (BUILD_TIMEOUT 150, BENCH_TIMEOUT 180, TEST_TIMEOUT 150, TRAIN_TIMEOUT 150
# seconds), and no phase may run past the whole check's budget (CHECK_BUDGET, 460 s, so that the check ends
# within 8 minutes): a later phase gets what is left. A phase that reaches its limit is interrupted (SIGINT, so pytest still writes its reports)
# and the check fails, but the later phases still run and everything measured so far is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$SECONDS
exec 3>&1  # the console, for messages from inside redirected commands
log() { echo "[gpu_check +$((SECONDS - started))s] $*" >&3; }
have() { $PY -c "import $1" >/dev/null 2>&1; }
CHECK_BUDGET=${CHECK_BUDGET:-460}
# run_limited SECONDS command...: at most SECONDS and never past the budget (less 20 s for the summary);
# SIGINT at the limit, SIGKILL 20 s later; 124 when the limit was reached.
run_limited() {
  local limit=$1 left=$((CHECK_BUDGET - (SECONDS - started) - 20)); shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then log "skipped (under 10 s left of its limit or of CHECK_BUDGET=$CHECK_BUDGET): $*"; return 124; fi
  timeout -s INT -k 20 "$limit" "$@"
}

device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'no_gpu')")
RESULTS_DIR=${RESULTS_DIR:-bench/results/$(date +%Y-%m-%d)-$device}
mkdir -p "$RESULTS_DIR"
status=0
log "device: $device; results in $RESULTS_DIR"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  $PY -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null
} >"$RESULTS_DIR/environment.txt"

# 1. The CUDA extension, for this GPU only (a fraction of the default build's time).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/mae_fast_site .whl/*.whl \
    && export PYTHONPATH=/tmp/mae_fast_site${PYTHONPATH:+:$PYTHONPATH}
fi
build_ext() {  # in the current folder
  MAE_FAST_CUDA_ARCHS=${MAE_FAST_CUDA_ARCHS:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} MAE_FAST_FORCE_CUDA_BUILD=1 \
    run_limited "${BUILD_TIMEOUT:-150}" $PY setup.py build_ext --inplace
}
if ls csrc/*.cu >/dev/null 2>&1; then
  arch=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
  log "building the CUDA extension for sm_${MAE_FAST_CUDA_ARCHS:-$arch}"
  if build_ext >"$RESULTS_DIR/build.log" 2>&1; then
    :
  elif grep -q "invalid pyproject.toml config" "$RESULTS_DIR/build.log"; then
    # setuptools older than 77 rejects pyproject.toml's SPDX license: build from a copy without it.
    log "this setuptools cannot read pyproject.toml; building from a copy of setup.py and csrc/ alone"
    stage=$(mktemp -d); cp -r setup.py csrc mae_fast kernels "$stage"/
    { (cd "$stage" && build_ext) >>"$RESULTS_DIR/build.log" 2>&1 && cp "$stage"/mae_fast/_C*.so mae_fast/; } \
      || { log "CUDA build FAILED (see build.log)"; status=1; }
  else
    log "CUDA build FAILED (see build.log)"; status=1
  fi
else
  log "no CUDA sources in csrc/: nothing to build"
fi

# 2. mae_fast importable, offline (after the build, so a symlinked tree holds the extension too).
if ! MAE_FAST_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$RESULTS_DIR/install.log" 2>&1; then
  log "editable install failed (see install.log); using a symlinked package tree"
  site=$(mktemp -d); mkdir -p "$site/mae_fast"
  for f in mae_fast/*; do ln -s "$PWD/$f" "$site/mae_fast/"; done
  ln -s "$PWD/kernels" "$site/mae_fast/kernels"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import mae_fast.kernels, mae_fast; print('mae_fast from', mae_fast.__file__)" || exit 1
$PY -c "import mae_fast.ops.dispatch as d; print('CUDA extension loaded:', d.cuda_extension_loaded())" 2>&1 | tee -a "$RESULTS_DIR/environment.txt"

# 3. Benchmarks at the real shapes, the ones the targets name first (a stopped run keeps what ran).
bench_order="bench/test_train_step.py bench/test_masked_patch_loss.py bench/test_data_loaders.py
  bench/test_gather_tokens.py bench/test_restore_tokens.py bench/test_gather_patches.py"
log "benchmarks"
rm -f "$RESULTS_DIR/bench_partial.jsonl"
MAE_FAST_BENCH_JSONL="$RESULTS_DIR/bench_partial.jsonl" run_limited "${BENCH_TIMEOUT:-180}" \
  $PY -m pytest ${BENCH_FILES:-$bench_order} -q -p no:cacheprovider -o addopts="" \
  -k "${BENCH_FILTER:-not vit_h14 and (not torch-compile or (masked_patch_loss and forward+backward))}" \
  --benchmark-json="$RESULTS_DIR/bench.json" --benchmark-storage="file://$(cd "$RESULTS_DIR" && pwd)" \
  --benchmark-save=gpu_check --benchmark-columns=median,rounds >"$RESULTS_DIR/bench.log" 2>&1 \
  || { log "benchmarks failed or were stopped (see bench.log)"; status=1; }
tail -n 3 "$RESULTS_DIR/bench.log"

# 4. The whole test suite, natively.
log "tests"
workers=(); have xdist && workers=(-n "${TEST_WORKERS:-8}")
per_test=(); have pytest_timeout && per_test=(--timeout "${TEST_CASE_TIMEOUT:-150}")
run_limited "${TEST_TIMEOUT:-150}" $PY -m pytest tests -q -p no:cacheprovider -o addopts="" "${workers[@]}" \
  "${per_test[@]}" -rfE --durations=25 --junitxml="$RESULTS_DIR/tests.xml" >"$RESULTS_DIR/tests.log" 2>&1 \
  || { log "tests failed or were stopped (see tests.log)"; status=1; }
grep -E "^(FAILED|ERROR)" "$RESULTS_DIR/tests.log" | head -n 20
tail -n 2 "$RESULTS_DIR/tests.log"

# 5. The real trainer end to end: ViT-B/16, batch 256, bf16, blocks compiled (--compile_scope blocks), images
#    made on the GPU (no decoding), so the images/s and MFU it logs are the training loop's own, logging,
#    schedule and optimizer included (the step benchmark above measures the eager model).
# The trainer's log lines, out of the progress bar's carriage returns.
train_lines() { tr '\r' '\n' <"$RESULTS_DIR/train.log" 2>/dev/null | grep -E "^ *step [0-9]+/[0-9]+ " | sed 's/^ *//'; }
log "trainer: python -m mae_fast.pretrain, ViT-B/16, batch 256, blocks compiled, synthetic data"
train_dir=$(mktemp -d)
train_flags=${TRAIN_FLAGS:---model mae_vit_base_patch16 --batch_size 256 --input_size 224}
run_limited "${TRAIN_TIMEOUT:-150}" $PY -m mae_fast.pretrain $train_flags \
  --norm_pix_loss --compile --compile_scope blocks --data_backend synthetic \
  --synthetic_samples 20480 --epochs 1 --warmup_epochs 0 --max_steps "${TRAIN_STEPS:-60}" --log_every 20 \
  --save_last_every 0 --output_dir "$train_dir" \
  >"$RESULTS_DIR/train.log" 2>&1 || { log "the training run failed or was stopped (see train.log)"; status=1; }
train_lines
rm -rf "$train_dir"

# 6. The summary, from the full JSON when pytest-benchmark wrote it, else from the lines written as it went.
if [ -s "$RESULTS_DIR/bench.json" ]; then
  $PY bench/summarize.py "$RESULTS_DIR/bench.json" >"$RESULTS_DIR/summary.md"
elif [ -s "$RESULTS_DIR/bench_partial.jsonl" ]; then
  $PY bench/summarize.py "$RESULTS_DIR/bench_partial.jsonl" >"$RESULTS_DIR/summary.md"
fi
if [ -n "$(train_lines)" ]; then
  { echo "## Training run"; echo
    echo "\`python -m mae_fast.pretrain $train_flags --compile --compile_scope blocks --data_backend synthetic\`"
    echo "(precision auto: bf16 on a GPU); the first line includes compilation and warm-up."
    echo; train_lines | sed 's/^/    /'; echo; } >>"$RESULTS_DIR/summary.md"
fi
[ -s "$RESULTS_DIR/summary.md" ] && cat "$RESULTS_DIR/summary.md"
if [ -n "${RESULTS_ARCHIVE:-}" ]; then  # everything in one file, to carry off the machine
  tar czf "$RESULTS_ARCHIVE" -C "$RESULTS_DIR" . && log "results packed into $RESULTS_ARCHIVE"
fi
log "done (status $status)"
exit $status
