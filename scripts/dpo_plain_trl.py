#!/usr/bin/env python
"""The baseline for scripts/bench_dpo.py: DPO the way the seed tutorial writes it, with plain TRL.

Same model, data, LoRA and steps as slmops' DPO recipe; everything else is TRL's default for a
CPU user: fp32 (DPOConfig's bf16 default refuses to start on CPU), TRL's own prompt extraction
and truncation. Prints one JSON line: train_runtime, num_tokens, steps.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--data", required=True, help="preference jsonl (chosen/rejected transcripts)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (use_cpu=True) instead of fp32")
    ap.add_argument("--output-dir", default="dpo-plain-trl")
    args = ap.parse_args()

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.select(range(min(len(dataset), args.steps * args.batch_size)))
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    config = DPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        beta=0.1,
        max_length=args.max_length,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=args.bf16,
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    result = trainer.train()
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    window = max(1, min(5, len(losses) // 4))  # as slmops' summary averages its last steps
    print(
        json.dumps(
            {
                "train_runtime": result.metrics["train_runtime"],
                "num_tokens": tokens[-1] if tokens else None,
                "steps": trainer.state.global_step,
                "final_loss": sum(losses[-window:]) / window,
            }
        )
    )


if __name__ == "__main__":
    main()
