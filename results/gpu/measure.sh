#!/usr/bin/env bash
# The GPU figures of the GPU-protocol issue, one run folder per execution mode, named as timm's results
# CSVs are: GPU, precision and mode. Run from the project root on a machine with a CUDA GPU:
#   results/gpu/measure.sh                      # DeiT-S and DeiT-B (about 25 minutes on an H100)
#   MODELS=deit_small_patch16_224 results/gpu/measure.sh
# Each run resumes where it stopped, so a session cut short loses nothing.
set -euo pipefail
models=${MODELS:-deit_small_patch16_224,deit_base_patch16_224}
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
bench=${BENCH:-python3 -m bench}
for mode in "fp16-autocast-eager:--precision fp16" "fp16-autocast-graphs:--precision fp16 --cuda-graphs" \
            "fp16-weights-eager:--model-dtype fp16" "fp16-weights-graphs:--model-dtype fp16 --cuda-graphs"; do
  name=${mode%%:*}
  # shellcheck disable=SC2086  # the mode's options are words
  $bench run --device cuda --models "$models" --keep-rates 0.5,0.7,0.9 --batch-sizes 1,16,64,256 \
    ${mode#*:} --out "results/gpu/$gpu-$name" --quiet
done
