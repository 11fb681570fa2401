#!/usr/bin/env bash
# The GPU check: everything the CPU machine cannot verify, in one run on one GPU, within CHECK_BUDGET seconds.
#
#   bash bench/gpu_check.sh                 # results in bench/results/<date>-<device>/
#   bash bench/gpu_check.sh --dry-run       # (or CHECK_DRY=1) every phase's command, GPU-only parts skipped
#   RESULTS_DIR=/some/dir RESULTS_ARCHIVE=/some/results.tgz CHECK_BUDGET=400 bash bench/gpu_check.sh
#
# Phases, cheapest and most telling first, so that a cut run has measured what matters:
#   setup       wheels in an ignored .whl/ folder installed offline; mae_fast importable (editable install, or the
#               checkout itself with mae_fast/kernels linked in); the CUDA extension: a prebuilt mae_fast/_C*.so that
#               loads is kept, else it is built for this GPU's architecture only (MAE_FAST_CUDA_ARCHS overrides)
#   selfcheck   python -m mae_fast.info --check: every fused op on every backend, attention, DALI decoding and a
#               compiled step against their references (its table is kept in the summary)
#   ops_tests   tests/ops natively (compiled Triton, the CUDA ops), on TEST_WORKERS processes
#   op_bench    the fused ops at ViT-B/16 and ViT-L/16 (seconds each; the compiled reference only for the
#               loss's forward+backward, which its target names); BENCH_FILTER (pytest -k) changes the selection
#   step_bench  the training step, only the cases its targets name (STEP_CASES changes them): compiled bf16 and
#               Hugging Face on ViT-B/16, then eager and the official code, then ViT-L/16 compiled and FP8
#   finetune_bench  the fine-tuning step's target cases (FINETUNE_CASES): compiled bf16 and timm on ViT-B/16,
#               compiled bf16 and FP8 on ViT-L/16
#   trainer     python -m mae_fast.pretrain, ViT-B/16, batch 256, blocks compiled, synthetic images on the GPU
#               (TRAIN_FLAGS, TRAIN_STEPS change it); its log lines give images/s, MFU and peak memory
#   tests       the rest of the test suite natively (attention backends, bf16 training, DALI mixed decoding
#               when DALI is installed)
#   data_bench  the data loaders on ImageNet-like JPEGs (the DALI GPU figure needs DALI among the wheels)
#   summary     bench/summarize.py: tables, every speed target met, MISSED or not measured; the phases table
#
# Time: each phase has a limit (<NAME>_TIMEOUT overrides it) and none runs past CHECK_BUDGET (default 480 s, less
# 15 s kept for the summary): a later phase gets what is left, or is skipped (a second call with CHECK_PHASES naming
# the skipped phases measures them). A phase at its limit is interrupted
# (SIGINT, so pytest still writes its reports; SIGKILL 15 s later), the check fails, later phases still run, and
# everything measured so far is kept (each finished benchmark is appended to bench_partial.jsonl). phases.md says
# for each phase whether it finished, failed, was cut at its limit or was skipped.
#
# CHECK_PHASES="selfcheck op_bench ..." runs only the phases named. The last line says how many targets were met,
# MISSED and NOT MEASURED. Exit status: 0 every phase finished and every target was measured and met; 1 a phase
# failed, was cut or skipped, or a target was MISSED; 3 every phase finished and nothing was MISSED, but some
# targets were NOT MEASURED (the DALI figures need DALI, the FP8 step torchao: carry them as wheels in .whl/).
#
# The dry run (no GPU needed) runs the same phases: pytest phases collect their selection (and fail if it is
# empty), the self-test and the trainer run on the CPU at their smallest, nothing is built; it measures nothing, so
# it exits 0 when every phase finished. CHECK_FORCE_FALLBACK=1 imports the checkout as when the editable install
# fails. The test suite runs both (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${CHECK_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$SECONDS
exec 3>&1  # the console, for messages from inside redirected commands
log() { echo "[gpu_check +$((SECONDS - started))s] $*" >&3; }
have() { $PY -c "import $1" >/dev/null 2>&1; }
CHECK_BUDGET=${CHECK_BUDGET:-480}
status=0

device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'no_gpu')" 2>/dev/null || echo unknown)
RESULTS_DIR=${RESULTS_DIR:-bench/results/$(date +%Y-%m-%d)-$device}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
PHASES="$RESULTS_DIR/phases.md"
printf '| phase | outcome | seconds | limit |\n|---|---|---:|---:|\n' >"$PHASES"
[ "$DRY" = 1 ] && log "dry run: GPU-only parts skipped"
log "device: $device; results in $RESULTS_DIR; budget ${CHECK_BUDGET}s"

# phase NAME LIMIT command...: runs the command (output to NAME.log) for at most LIMIT seconds (NAME_TIMEOUT, in
# upper case, overrides it) and never past the budget; records the outcome in phases.md. CHECK_PHASES (names,
# space-separated) runs only those phases.
phase() {
  local name=$1 limit=$2; shift 2
  local var="${name^^}_TIMEOUT"; limit=${!var:-$limit}
  local left=$((CHECK_BUDGET - (SECONDS - started) - 15)) t0=$SECONDS rc outcome
  if [ -n "${CHECK_PHASES:-}" ] && [[ " $CHECK_PHASES " != *" $name "* ]]; then
    echo "| $name | not selected (CHECK_PHASES) | 0 | - |" >>"$PHASES"; return 0
  fi
  if [ "$left" -lt "$limit" ]; then
    limit=$left
    if [ "$limit" -lt 10 ]; then
      log "$name: SKIPPED (under 10 s left of CHECK_BUDGET=$CHECK_BUDGET)"
      echo "| $name | SKIPPED: no time left | 0 | - |" >>"$PHASES"; status=1; return 124
    fi
  fi
  log "$name (limit ${limit}s)"
  timeout -s INT -k 15 "$limit" "$@" >"$RESULTS_DIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) outcome="finished" ;;
    124|137) outcome="CUT at its limit"; status=1 ;;
    *) outcome="FAILED (exit $rc)"; status=1 ;;
  esac
  log "$name: $outcome in $((SECONDS - t0))s (see $name.log)"
  echo "| $name | $outcome | $((SECONDS - t0)) | $limit |" >>"$PHASES"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  $PY -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null
  git rev-parse HEAD 2>/dev/null | sed 's/^/revision /'
} >"$RESULTS_DIR/environment.txt"

# --- setup ---------------------------------------------------------------------------------------------------------
# Wheels carried in .whl/ (a machine without a registry): installed beside, never over, what is there.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/mae_fast_site .whl/*.whl \
    >"$RESULTS_DIR/wheels.log" 2>&1 && export PYTHONPATH=/tmp/mae_fast_site${PYTHONPATH:+:$PYTHONPATH}
fi
# mae_fast importable. The editable install maps kernels/ to mae_fast.kernels; without it (an old setuptools cannot
# read pyproject.toml, say) the checkout itself is imported, with mae_fast/kernels a link to kernels/ (removed at
# exit), so whichever copy of mae_fast comes first on sys.path is a whole one.
link_kernels() {
  [ -e mae_fast/kernels ] || { ln -s ../kernels mae_fast/kernels && trap 'rm -f mae_fast/kernels' EXIT; }
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}
if [ "${CHECK_FORCE_FALLBACK:-0}" = 1 ]; then
  log "CHECK_FORCE_FALLBACK=1: importing the checkout with mae_fast/kernels linked"; link_kernels
elif ! $PY -c "import mae_fast.kernels" >/dev/null 2>&1; then
  if MAE_FAST_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      >"$RESULTS_DIR/install.log" 2>&1 && $PY -c "import mae_fast.kernels" >/dev/null 2>&1; then
    log "editable install done"
  else
    log "editable install failed (see install.log); importing the checkout with mae_fast/kernels linked"
    link_kernels
  fi
fi
# Imported from outside the checkout, so the result is what every phase's python sees, whatever its working folder.
(cd /tmp && $PY -c "import mae_fast, mae_fast.kernels; print('mae_fast from', mae_fast.__file__)") \
  >>"$RESULTS_DIR/environment.txt" 2>&1 || { log "mae_fast cannot be imported (see environment.txt)"; exit 1; }
# The CUDA extension: kept when a prebuilt one loads, else built for this GPU only (a fraction of the full build).
# setuptools older than 77 rejects pyproject.toml's SPDX license: then it is built from a copy without that file.
extension_loads() { $PY -c "import mae_fast._C" >/dev/null 2>&1; }
if [ "$DRY" = 1 ]; then
  log "dry run: the CUDA extension is not built"
elif extension_loads; then
  log "the prebuilt CUDA extension loads: not rebuilding"
elif ls csrc/*.cu >/dev/null 2>&1; then
  arch=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
  build_env=(env MAE_FAST_CUDA_ARCHS="${MAE_FAST_CUDA_ARCHS:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
             MAE_FAST_FORCE_CUDA_BUILD=1)
  if ! phase build 150 "${build_env[@]}" $PY setup.py build_ext --inplace \
      && grep -q "invalid pyproject.toml config" "$RESULTS_DIR/build.log"; then
    stage=$(mktemp -d); mkdir "$stage/mae_fast"; cp -r setup.py csrc kernels "$stage"/
    cp mae_fast/*.py "$stage/mae_fast/"
    phase build_staged 150 "${build_env[@]}" bash -c "cd '$stage' && $PY setup.py build_ext --inplace" \
      && cp "$stage"/mae_fast/_C*.so mae_fast/ && status=0  # the staged build replaces the failed one
  fi
fi
$PY -c "import mae_fast.ops.dispatch as d; print('CUDA extension loaded:', d.cuda_extension_loaded())" \
  2>&1 | tee -a "$RESULTS_DIR/environment.txt" >&3

# --- the phases ----------------------------------------------------------------------------------------------------
workers=(); have xdist && workers=(-n "${TEST_WORKERS:-8}")
per_test=(); have pytest_timeout && per_test=(--timeout "${TEST_CASE_TIMEOUT:-60}")
collect=(); [ "$DRY" = 1 ] && { collect=(--collect-only); workers=(); per_test=(); }
pytest_run=($PY -m pytest -p no:cacheprovider -o addopts="" -q "${collect[@]}")
# A selection that collects nothing is a broken check, not a pass (pytest exits 5 then).
selfcheck_flags=(--check); [ "$DRY" = 1 ] && selfcheck_flags+=(--quick)
phase selfcheck 90 $PY -m mae_fast.info "${selfcheck_flags[@]}"
grep -E "^\| .* \| FAIL \|" "$RESULTS_DIR/selfcheck.log" 2>/dev/null >&3

phase ops_tests 100 "${pytest_run[@]}" tests/ops "${workers[@]}" "${per_test[@]}" -rfE \
  --junitxml="$RESULTS_DIR/ops_tests.xml"
grep -E "^(FAILED|ERROR)" "$RESULTS_DIR/ops_tests.log" 2>/dev/null | head -n 20 >&3

rm -f "$RESULTS_DIR/bench_partial.jsonl"
export MAE_FAST_BENCH_JSONL="$RESULTS_DIR/bench_partial.jsonl"
bench_opts=(--benchmark-columns=median,rounds --benchmark-storage="file://$RESULTS_DIR")
[ "$DRY" = 1 ] && bench_opts+=(--benchmark-disable)
phase op_bench 100 "${pytest_run[@]}" bench/test_masked_patch_loss.py bench/test_restore_tokens.py \
  bench/test_gather_tokens.py bench/test_gather_patches.py "${bench_opts[@]}" \
  -k "${BENCH_FILTER:-not vit_h14 and (not torch-compile or (masked_patch_loss and forward+backward))}" \
  --benchmark-json="$RESULTS_DIR/op_bench.json" --benchmark-save=op_bench

# The step cases the targets name, in the order they matter; node ids run in the order given.
step_ids=(); for case in ${STEP_CASES:-mae_vit_base_patch16-mae_fast-compile mae_vit_base_patch16-huggingface \
    mae_vit_base_patch16-mae_fast mae_vit_base_patch16-official-pytorch mae_vit_large_patch16-mae_fast-compile \
    mae_vit_large_patch16-mae_fast-fp8 mae_vit_large_patch16-huggingface}; do
  step_ids+=("bench/test_train_step.py::test_train_step[$case]")
done
[ "$DRY" = 1 ] && step_ids=(bench/test_train_step.py)  # the CPU has other (tiny) presets: collect them all
phase step_bench 150 "${pytest_run[@]}" "${step_ids[@]}" "${bench_opts[@]}" \
  --benchmark-json="$RESULTS_DIR/step_bench.json" --benchmark-save=step_bench

# The fine-tuning step, the cases its targets name: compiled bf16 and timm on ViT-B/16, compiled bf16 and FP8 on ViT-L/16.
ft_ids=(); for case in ${FINETUNE_CASES:-vit_base_patch16-mae_fast-compile vit_base_patch16-timm \
    vit_large_patch16-mae_fast-compile vit_large_patch16-mae_fast-fp8}; do
  ft_ids+=("bench/test_finetune_step.py::test_finetune_step[$case]")
done
[ "$DRY" = 1 ] && ft_ids=(bench/test_finetune_step.py)
phase finetune_bench 120 "${pytest_run[@]}" "${ft_ids[@]}" "${bench_opts[@]}" \
  --benchmark-json="$RESULTS_DIR/finetune_bench.json" --benchmark-save=finetune_bench

# The trainer's log lines, out of the progress bar's carriage returns.
train_lines() { tr '\r' '\n' <"$RESULTS_DIR/trainer.log" 2>/dev/null | grep -E "^ *step [0-9]+/[0-9]+ " | sed 's/^ *//'; }
train_dir=$(mktemp -d)
train_flags=${TRAIN_FLAGS:---model mae_vit_base_patch16 --batch_size 256 --input_size 224}
train_steps=${TRAIN_STEPS:-40}
train_compile="--compile --compile_scope blocks"
if [ "$DRY" = 1 ]; then  # no compilation: inductor would take minutes on a CPU
  train_flags="--model mae_vit_tiny_patch16 --batch_size 4 --input_size 32 --device cpu"; train_steps=2; train_compile=""
fi
phase trainer 80 $PY -m mae_fast.pretrain $train_flags --norm_pix_loss $train_compile \
  --data_backend synthetic --synthetic_samples 20480 --epochs 1 --warmup_epochs 0 --max_steps "$train_steps" \
  --log_every 10 --save_last_every 0 --output_dir "$train_dir"
train_lines >&3
rm -rf "$train_dir"

phase tests 150 "${pytest_run[@]}" tests --ignore=tests/ops "${workers[@]}" "${per_test[@]}" -rfE --durations=15 \
  --junitxml="$RESULTS_DIR/tests.xml"
grep -E "^(FAILED|ERROR)" "$RESULTS_DIR/tests.log" 2>/dev/null | head -n 20 >&3

phase data_bench 90 "${pytest_run[@]}" bench/test_data_loaders.py "${bench_opts[@]}" \
  --benchmark-json="$RESULTS_DIR/data_bench.json" --benchmark-save=data_bench

# --- summary -------------------------------------------------------------------------------------------------------
results=()
for f in op_bench step_bench finetune_bench data_bench; do [ -s "$RESULTS_DIR/$f.json" ] && results+=("$RESULTS_DIR/$f.json"); done
[ -s "$RESULTS_DIR/bench_partial.jsonl" ] && results+=("$RESULTS_DIR/bench_partial.jsonl")
{ $PY bench/summarize.py "${results[@]}"
  if [ -n "$(train_lines)" ]; then
    echo "## Training run"; echo
    echo "\`python -m mae_fast.pretrain $train_flags --norm_pix_loss $train_compile --data_backend synthetic\`"
    echo "(precision auto: bf16 on a GPU); the first line includes compilation and warm-up."
    echo; train_lines | sed 's/^/    /'; echo
  fi
  if [ -s "$RESULTS_DIR/selfcheck.log" ]; then
    echo "## Self-test (python -m mae_fast.info ${selfcheck_flags[*]})"; echo
    grep -E "^\|" "$RESULTS_DIR/selfcheck.log"; echo; tail -n 1 "$RESULTS_DIR/selfcheck.log"; echo
  fi
  echo "## Phases"; echo; cat "$PHASES"; echo
} >"$RESULTS_DIR/summary.md" 2>"$RESULTS_DIR/summary.log" || status=1
cat "$RESULTS_DIR/summary.md" >&3
targets=$(grep -E "^Targets: " "$RESULTS_DIR/summary.md" | tail -n 1)
not_measured=$(echo "$targets" | sed -nE 's/.* ([0-9]+) of [0-9]+ NOT MEASURED.*/\1/p')
missed=$(echo "$targets" | sed -nE 's/.* ([0-9]+) MISSED.*/\1/p')
[ "${missed:-0}" -gt 0 ] && status=1
# Exit status: 0 every phase finished and every target was measured and met; 1 a phase failed, was cut or skipped,
# or a target was MISSED; 3 all phases finished and nothing was MISSED, but some targets were NOT MEASURED (the
# dry run measures nothing by design: 0 there).
if [ "$status" = 0 ] && [ "${not_measured:-0}" -gt 0 ] && [ "$DRY" != 1 ]; then status=3; fi
if [ -n "${RESULTS_ARCHIVE:-}" ]; then  # everything in one file, to carry off the machine
  tar czf "$RESULTS_ARCHIVE" -C "$RESULTS_DIR" . && log "results packed into $RESULTS_ARCHIVE"
fi
log "done (status $status): ${targets:-no summary}"
exit $status
