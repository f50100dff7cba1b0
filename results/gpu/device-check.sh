#!/usr/bin/env bash
# The GPU check of the selection-overhead issue (#12) in one command, for a GPU machine lent for minutes
# (about 12 on an H100): the CUDA-only tests (the GPU computes what the CPU computes; every method replays
# from a CUDA graph), each reduction step's kernel launches and time against its floor's at batch 64, then
# selection.sh. Each part runs even if one before it failed. What it measures goes to $OUT (default
# results/gpu/out), 7 files: two logs and the benchmark's JSON, selection.sh's log and its three records.
set -uo pipefail
out=${OUT:-results/gpu/out}
mkdir -p "$out"
python3 -m pytest -q tests/test_selection_cost.py tests/test_launches.py >"$out/tests.log" 2>&1
TOKENBENCH_BENCH_DEVICE=cuda TOKENBENCH_BENCH_BATCH=64 python3 -m pytest -q benchmarks/test_reduction_step.py \
  --benchmark-only --benchmark-json="$out/reduction-step.json" >"$out/reduction-step.log" 2>&1
"$(dirname "$0")/selection.sh" >"$out/selection.log" 2>&1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
for run in selection selection-evo-vit-official selection-tome; do
  cp "results/gpu/$gpu-$run/records.csv" "$out/$run.csv"
done
