#!/usr/bin/env bash
# The GPU check of the selection-overhead issue (#12) in one call of the device tool (at most 10 minutes,
# and 15 of device time a session, the machine's start included): by priority, selection.sh (the goals'
# figures), the CUDA-only tests (the GPU computes what the CPU computes; every method replays from a CUDA
# graph; the execution modes; ToMe's size bias in whichever attention kernel SDPA picks), then each
# reduction step's kernel launches and time against its floor's at batch 64. Each part runs within what
# is left of BUDGET_S seconds (default 540) and is skipped, with a line in skipped.log, when less than it
# needs is left; each runs even if one before it failed. What it measures goes to $OUT (default
# results/gpu/out), at most 8 files: selection.sh's log and its three records (copied even from a run
# cut short), the tests' log, the benchmark's log and JSON, skipped.log.
set -uo pipefail
out=${OUT:-results/gpu/out}
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-540}))
within() {  # SECONDS_NEEDED SECONDS_TO_LEAVE COMMAND...: run COMMAND, stopped so that SECONDS_TO_LEAVE remain
  local need=$1 spare=$2
  shift 2
  local left=$((deadline - SECONDS - spare))
  if ((left < need)); then
    echo "skipped, ${left} s left: $*" >>"$out/skipped.log"
    return
  fi
  timeout "$left" "$@"
}
within 120 150 "$(dirname "$0")/selection.sh" >"$out/selection.log" 2>&1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
for run in selection selection-evo-vit-official selection-tome; do
  cp "results/gpu/$gpu-$run/records.csv" "$out/$run.csv" 2>/dev/null
done
within 60 30 python3 -m pytest -q tests/test_selection_cost.py tests/test_launches.py tests/test_modes.py \
  tests/test_tome.py::test_size_bias_reaches_the_fused_kernel_as_the_reference_math_computes_it >"$out/tests.log" 2>&1
within 30 0 env TOKENBENCH_BENCH_DEVICE=cuda TOKENBENCH_BENCH_BATCH=64 python3 -m pytest -q \
  benchmarks/test_reduction_step.py --benchmark-only --benchmark-json="$out/reduction-step.json" \
  >"$out/reduction-step.log" 2>&1
