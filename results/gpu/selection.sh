#!/usr/bin/env bash
# The figures of the selection-overhead issue (#12): each method's speedup as a share of its floor's,
# DeiT-S at 224, fp16 autocast, replayed from CUDA graphs, at batch 64 and 256. Goals: evit and prune at
# least 97% of their floor, dynamicvit 94%, evo-vit (both variants) 95%. Run from the project root on a
# machine with a CUDA GPU (about 10 minutes on an H100); a run cut short resumes where it stopped.
set -euo pipefail
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
bench=${BENCH:-python3 -m bench}
grid=(--device cuda --model deit_small_patch16_224 --precision fp16 --cuda-graphs --batch-sizes 64,256
      --keep-rates 0.5,0.7,0.9 --quiet)
$bench run "${grid[@]}" --methods evit,prune,dynamicvit,evo-vit --out "results/gpu/$gpu-selection"
$bench run "${grid[@]}" --methods evo-vit --method-args evo-vit:variant=official \
  --out "results/gpu/$gpu-selection-evo-vit-official"
$bench report "results/gpu/$gpu-selection"
$bench report "results/gpu/$gpu-selection-evo-vit-official"
