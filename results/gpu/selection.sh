#!/usr/bin/env bash
# The figures of the selection-overhead issue (#12): each method's speedup as a share of its floor's,
# DeiT-S at 224, fp16 autocast, replayed from CUDA graphs, at batch 256 and 64. Goals: evit and prune at
# least 97% of their floor, dynamicvit 94%, evo-vit (both variants) 95%. Also ToMe at its DeiT setting r = 13
# (keep rate 0.2), whose issue (#13) asked for 1.15x vanilla at batch 256. Run from the project root on a
# machine with a CUDA GPU (about 38 rows, a few minutes). Batch 256 runs first, so a run cut short holds the
# goals' rows; run again, it resumes where it stopped. Each run is tried even if one before it failed.
set -uo pipefail
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
bench=${BENCH:-python3 -m bench}
mode=(--device cuda --model deit_small_patch16_224 --precision fp16 --cuda-graphs --quiet)
rates=(--keep-rates 0.5,0.7,0.9)
failed=0
try() {
  "$@" || { echo "FAILED (exit $?): $*"; failed=1; }
}
for batch in 256 64; do
  try $bench run "${mode[@]}" --batch-sizes $batch "${rates[@]}" --methods evit,prune,dynamicvit,evo-vit \
    --out "results/gpu/$gpu-selection"
  try $bench run "${mode[@]}" --batch-sizes $batch "${rates[@]}" --methods evo-vit \
    --method-args evo-vit:variant=official --out "results/gpu/$gpu-selection-evo-vit-official"
done
try $bench run "${mode[@]}" --batch-sizes 256,64 --keep-rates 0.2 --methods tome --out "results/gpu/$gpu-selection-tome"
for run in selection selection-evo-vit-official selection-tome; do
  try $bench report "results/gpu/$gpu-$run"
done
exit $failed
