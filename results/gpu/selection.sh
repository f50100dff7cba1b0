#!/usr/bin/env bash
# The figures of the selection-overhead issue (#12): each method's speedup as a share of its floor's,
# DeiT-S at 224, fp16 autocast, replayed from CUDA graphs, at batch 64 and 256. Goals: evit and prune at
# least 97% of their floor, dynamicvit 94%, evo-vit (both variants) 95%. Also ToMe at its DeiT setting r = 13
# (keep rate 0.2), whose issue (#13) asks for 1.15x vanilla at batch 256. Run from the project root on a
# machine with a CUDA GPU (about 12 minutes on an H100); a run cut short resumes where it stopped.
set -euo pipefail
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
bench=${BENCH:-python3 -m bench}
mode=(--device cuda --model deit_small_patch16_224 --precision fp16 --cuda-graphs --batch-sizes 64,256 --quiet)
grid=("${mode[@]}" --keep-rates 0.5,0.7,0.9)
$bench run "${grid[@]}" --methods evit,prune,dynamicvit,evo-vit --out "results/gpu/$gpu-selection"
$bench run "${grid[@]}" --methods evo-vit --method-args evo-vit:variant=official \
  --out "results/gpu/$gpu-selection-evo-vit-official"
$bench run "${mode[@]}" --keep-rates 0.2 --methods tome --out "results/gpu/$gpu-selection-tome"
for run in selection selection-evo-vit-official selection-tome; do
  $bench report "results/gpu/$gpu-$run"
done
