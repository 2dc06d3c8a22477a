#!/usr/bin/env bash
# The main job on the embedded default model, with few steps so that it runs in minutes on a CPU:
# a LoRA SFT of SmolLM2-135M-Instruct on H4rmony and a DPO adapter on hh-rlhf, both through
# Olive, then a held-out preference evaluation of the DPO adapter. Export, generate and bench
# join this script as they land. Data: $SLMOPS_DATA_DIR (default ../shared/data beside the repo).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export SLMOPS_DATA_DIR="${SLMOPS_DATA_DIR:-$here/../shared/data}"
out="${SLMOPS_DEMO_OUT:-$here/outputs/demo-$(date +%Y%m%d-%H%M%S)}"
sft_steps="${SLMOPS_DEMO_SFT_STEPS:-20}"
dpo_steps="${SLMOPS_DEMO_DPO_STEPS:-8}"

slmops finetune --recipe "$here/recipes/smollm2-135m-sft-h4rmony.yaml" \
  --set training.max_steps="$sft_steps" -o "$out/sft-h4rmony"
slmops finetune --recipe "$here/recipes/smollm2-135m-dpo-hh.yaml" \
  --set dpo.max_steps="$dpo_steps" --set dpo.data.eval_max_samples=20 -o "$out/dpo-hh"
slmops eval --recipe "$here/recipes/smollm2-135m-dpo-hh.yaml" --adapter "$out/dpo-hh/adapter" \
  --limit 60 --dtype bfloat16
echo "demo outputs: $out"
