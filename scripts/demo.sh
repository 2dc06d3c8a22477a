#!/usr/bin/env bash
# The main job on the embedded default model: a short LoRA SFT of SmolLM2-135M-Instruct on the
# H4rmony data, through Olive. Later stages (DPO, export, generate, bench) join this script as
# they land. Data is looked up in $SLMOPS_DATA_DIR (default: ../shared/data next to the repo).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export SLMOPS_DATA_DIR="${SLMOPS_DATA_DIR:-$here/../shared/data}"
out="${SLMOPS_DEMO_OUT:-$here/outputs/demo-$(date +%Y%m%d-%H%M%S)}"
steps="${SLMOPS_DEMO_STEPS:-20}"

slmops finetune --recipe "$here/recipes/smollm2-135m-sft-h4rmony.yaml" \
  --set training.max_steps="$steps" -o "$out/sft"
echo "demo outputs: $out"
