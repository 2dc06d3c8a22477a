#!/usr/bin/env bash
# The main job on the embedded default model, with few steps so that it runs in minutes on a CPU:
# two LoRA SFT adapters of SmolLM2-135M-Instruct on H4rmony (r=8 on q/k/v/o, and r=8 on q/v) and a
# DPO adapter on hh-rlhf, all through Olive; a held-out preference evaluation of the DPO adapter;
# one int4 CPU bundle with the three adapters (Olive's model builder + adapter extraction); verify
# with parity against PyTorch; a reply from the base and from each adapter; `slmops bench` against
# PyTorch and llama.cpp.
# Data: $SLMOPS_DATA_DIR (default ../shared/data beside the repo).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export SLMOPS_DATA_DIR="${SLMOPS_DATA_DIR:-$here/../shared/data}"
out="${SLMOPS_DEMO_OUT:-$here/outputs/demo-$(date +%Y%m%d-%H%M%S)}"
sft_steps="${SLMOPS_DEMO_SFT_STEPS:-20}"
dpo_steps="${SLMOPS_DEMO_DPO_STEPS:-8}"

slmops finetune --recipe "$here/recipes/smollm2-135m-sft-h4rmony.yaml" \
  --set training.max_steps="$sft_steps" -o "$out/sft-h4rmony"
slmops finetune --recipe "$here/recipes/smollm2-135m-sft-h4rmony.yaml" \
  --set training.max_steps="$sft_steps" --set lora.r=8 --set "lora.target_modules=[q_proj, v_proj]" \
  --set training.learning_rate=4e-4 -o "$out/sft-h4rmony-qv"
slmops finetune --recipe "$here/recipes/smollm2-135m-dpo-hh.yaml" \
  --set dpo.max_steps="$dpo_steps" --set dpo.data.eval_max_samples=20 -o "$out/dpo-hh"
slmops eval --recipe "$here/recipes/smollm2-135m-dpo-hh.yaml" --adapter "$out/dpo-hh/adapter" \
  --limit 60 --dtype bfloat16

slmops export -a sft="$out/sft-h4rmony" -a sft-qv="$out/sft-h4rmony-qv" -a dpo="$out/dpo-hh" \
  --target cpu --precision int4 -o "$out/bundle"
slmops verify "$out/bundle" --parity

prompt="How can I make my home more energy efficient?"
replies="$out/replies.jsonl"
: > "$replies"
for adapter in base sft sft-qv dpo; do
  flag=(); [ "$adapter" = base ] || flag=(--adapter "$adapter")
  slmops generate "$out/bundle" "${flag[@]}" --prompt "$prompt" --max-new-tokens 64 --json >> "$replies"
done
python3 - "$replies" "$prompt" <<'PY'
import json, sys
print(f"\nprompt: {sys.argv[2]}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"\n--- {r['adapter'] or 'base'}:\n{r['text'].strip()}")
print()
PY

# The benchmark table: onnxruntime-genai vs PyTorch fp32 (+PEFT) and llama.cpp on the same GGUF, timed
# interleaved in one process, per adapter, with the adapter cost (the README's table adds 4096 tokens and 5 reps).
slmops bench "$out/bundle" --baseline pytorch --baseline llamacpp --scenario 128:128 --scenario 1024:128 --reps 2
echo "demo outputs: $out"
