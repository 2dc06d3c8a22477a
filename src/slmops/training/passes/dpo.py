"""DPO as an Olive pass: TRL's DPOTrainer on an HF model, with or without an adapter.

Input: an HfModelHandler, bare or with a LoRA adapter (for example from Olive's LoRA pass).
Output: the same base with a new adapter (adapter_path), so export and later passes see a
normal Olive LoRA output.
Reference model: with an input adapter, TRL copies it as a frozen "ref" adapter, so the reference
is the SFT policy; without one, the reference is the base with the adapter disabled. Neither
keeps a second copy of the model in memory.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any, Union, cast

from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import HfModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

logger = logging.getLogger(__name__)


class DPO(Pass):
    """Direct Preference Optimization with TRL's DPOTrainer, training a LoRA adapter."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        p = PassConfigParam
        return {
            "train_data_config": p(
                type_=Union[DataConfig, dict],
                required=True,
                description="Preference pairs: {prompt: messages, chosen: str, rejected: str}.",
            ),
            "eval_data_config": p(
                type_=Union[DataConfig, dict],
                default_value=None,
                description="Held-out preference pairs for eval loss and reward metrics.",
            ),
            "beta": p(type_=float, default_value=0.1, description="KL strength: how far the policy may move."),
            "loss_type": p(type_=list[str], default_value=["sigmoid"], description="TRL DPO loss type(s)."),
            "max_length": p(
                type_=int, default_value=512, description="Tokens per prompt + answer; prompts shrink first."
            ),
            "learning_rate": p(type_=float, default_value=5e-5, description="Peak learning rate."),
            "lr_scheduler_type": p(type_=str, default_value="linear", description="Learning rate schedule."),
            "warmup_ratio": p(type_=float, default_value=0.0, description="Fraction of steps spent warming up."),
            "max_steps": p(type_=int, default_value=-1, description="Optimizer steps; -1 uses num_train_epochs."),
            "num_train_epochs": p(type_=float, default_value=1.0, description="Epochs when max_steps is -1."),
            "per_device_train_batch_size": p(type_=int, default_value=2, description="Pairs per step per device."),
            "gradient_accumulation_steps": p(type_=int, default_value=1, description="Micro-batches per step."),
            "r": p(type_=int, default_value=16, description="LoRA rank of a fresh adapter."),
            "alpha": p(type_=float, default_value=32, description="LoRA alpha of a fresh adapter."),
            "lora_dropout": p(type_=float, default_value=0.05, description="LoRA dropout of a fresh adapter."),
            "target_modules": p(
                type_=list[str],
                default_value=None,
                description="Modules for a fresh adapter (default: q_proj, v_proj).",
            ),
            "torch_dtype": p(
                type_=str,
                default_value="bfloat16",
                description="bfloat16 / float16: mixed-precision autocast over fp32 weights; float32.",
            ),
            "quantization": p(
                type_=str,
                default_value=None,
                description="4bit: the base in nf4 (QLoRA + DPO); 8bit: in int8. Needs bitsandbytes.",
            ),
            "optim": p(type_=str, default_value="adamw_torch", description="Optimizer (transformers' name)."),
            "precompute_ref_log_probs": p(
                type_=bool, default_value=False, description="Compute reference log-probs once before training."
            ),
            "share_prompt": p(
                type_=bool,
                default_value=True,
                description="Run each pair's common prefix once (exact; off for models that cannot).",
            ),
            "gradient_checkpointing": p(type_=bool, default_value=False, description="Trade compute for memory."),
            "logging_steps": p(type_=int, default_value=1, description="Log every N steps."),
            "save_steps": p(type_=int, default_value=None, description="Checkpoint every N steps (default: at end)."),
            "output_dir": p(type_=str, default_value=None, description="Checkpoints folder (default: temporary)."),
            "seed": p(type_=int, default_value=42, description="Random seed."),
            "extra_args": p(type_=dict, default_value=None, description="Extra DPOConfig keys, passed through."),
            "report_to": p(
                type_=list[str],
                default_value=None,
                description="Experiment trackers (tensorboard, wandb, mlflow); none by default.",
            ),
        }

    def _run_for_config(
        self, model: HfModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> HfModelHandler:
        from peft import PeftModel

        from slmops.training.passes.shared_prompt import SharedPromptDPOTrainer

        tokenizer = model.get_hf_tokenizer()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy, peft_config = self._load_policy(model, config)
        train = self._pairs(config.train_data_config, tokenizer, config.max_length)
        if config.max_steps > 0:
            # Only the pairs the steps will see (one epoch): reference log-probs are not spent on the rest.
            processes = int(os.environ.get("WORLD_SIZE", "1"))  # data-parallel ranks share out the global batch
            used = (
                config.max_steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
            )
            train = train.shuffle(seed=config.seed).select(range(min(used, len(train))))
        held = self._pairs(config.eval_data_config, tokenizer, config.max_length) if config.eval_data_config else None
        with tempfile.TemporaryDirectory(prefix="slmops-dpo-") as tmp:
            args = self._dpo_config(config, config.output_dir or tmp, has_eval=held is not None)
            trainer = SharedPromptDPOTrainer(
                policy,
                share_prompt=config.share_prompt,
                args=args,
                train_dataset=train,
                eval_dataset=held,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
            trainer.train(resume_from_checkpoint=self._last_checkpoint(args.output_dir))
            if trainer.is_world_process_zero():  # with several processes, only rank 0 writes shared files
                # The last checkpoint predates the trainer's final summary (train_runtime): keep all of it.
                (Path(args.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history))
            adapter_path = Path(output_model_path) / "adapter"
            adapter_path.mkdir(parents=True, exist_ok=True)
            # A PeftModel: the policy came with its adapter, or the trainer wrapped it with peft_config.
            cast(PeftModel, trainer.model).save_pretrained(
                str(adapter_path), selected_adapters=["default"], save_embedding_layers=False
            )
        del trainer, policy
        output = deepcopy(model)
        output.set_resource("adapter_path", adapter_path)
        return output

    @staticmethod
    def _last_checkpoint(output_dir: str):
        """An interrupted run's newest checkpoint in output_dir: training continues from it (as Olive's LoRA does)."""
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if checkpoint:
            logger.info("Resuming DPO from %s", checkpoint)
        return checkpoint

    @staticmethod
    def _load_policy(model: HfModelHandler, config) -> tuple[Any, Any]:
        """The trainable model, and a LoRA config when a fresh adapter must be created."""
        import torch
        from peft import LoraConfig, PeftModel
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        load_kwargs = model.load_kwargs.model_dump() if model.load_kwargs else {}
        if load_kwargs.get("trust_remote_code"):
            kwargs["trust_remote_code"] = True
        if config.quantization:
            from transformers import BitsAndBytesConfig

            compute = torch.float16 if config.torch_dtype == "float16" else torch.bfloat16
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True)
                if config.quantization == "8bit"
                else BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=compute,
                )
            )
        base = AutoModelForCausalLM.from_pretrained(model.model_path, **kwargs)
        if model.adapter_path:
            return PeftModel.from_pretrained(base, model.adapter_path, is_trainable=True), None
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            bias="none",
            target_modules=config.target_modules or ["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        )
        return base, lora

    @staticmethod
    def _pairs(data_config: DataConfig, tokenizer, max_length: int):
        """TRL's conversational preference format, prompts fitted so the answers survive truncation."""
        from datasets import Dataset

        from slmops.training.data import fit_prompt

        container = data_config.to_data_container()
        examples = container.pre_process(container.load_dataset())
        rows = []
        for example in examples:
            fitted = fit_prompt(example, tokenizer, max_length)
            rows.append(
                {
                    "prompt": fitted["prompt"],
                    "chosen": [{"role": "assistant", "content": fitted["chosen"]}],
                    "rejected": [{"role": "assistant", "content": fitted["rejected"]}],
                }
            )
        return Dataset.from_list(rows)

    @staticmethod
    def _dpo_config(config, output_dir: str, has_eval: bool):
        import torch
        from trl import DPOConfig

        on_gpu = torch.cuda.is_available()
        mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(config.torch_dtype)
        args = {
            "output_dir": output_dir,
            "beta": config.beta,
            "loss_type": list(config.loss_type),
            "max_length": config.max_length,
            "truncation_mode": "keep_start",
            "learning_rate": config.learning_rate,
            "lr_scheduler_type": config.lr_scheduler_type,
            "warmup_steps": config.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
            "max_steps": config.max_steps,
            "num_train_epochs": config.num_train_epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "per_device_eval_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "gradient_checkpointing": config.gradient_checkpointing,
            "optim": config.optim,
            "logging_steps": config.logging_steps,
            "save_strategy": "steps",
            "save_steps": config.save_steps or (config.max_steps if config.max_steps > 0 else 500),
            "save_total_limit": 1,
            "seed": config.seed,
            "data_seed": config.seed,
            "report_to": list(config.report_to or []) or "none",
            # On CPU, DPOConfig refuses bf16 unless use_cpu=True; then it is CPU autocast.
            "use_cpu": not on_gpu,
            "bf16": mixed == "bf16",
            "fp16": mixed == "fp16" and on_gpu,
        }
        if has_eval:
            # No step-0 eval: policy == reference there, so every reward is 0 by construction.
            args.update(
                eval_strategy="steps",
                eval_steps=config.save_steps or (config.max_steps if config.max_steps > 0 else 500),
            )
        args.update(config.extra_args or {})
        return DPOConfig(**args)
