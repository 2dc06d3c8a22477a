"""Recipe -> Olive workflow config (a pure function), and the golden configs of the shipped recipes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from slmops.core.workflows import validate_with_olive, workflow
from slmops.training.data import DataSource
from slmops.training.recipe import Recipe

SFT_PASS, DPO_PASS = "sft", "dpo"
# qlora: Olive's QLoRA trains every linear layer whatever target_modules says (slmops.training.passes.qlora)
_OLIVE_PASS = {"lora": "LoRA", "qlora": "SlmopsQLoRA"}
# training.packing: the same passes with a collator that keeps packed rows' position ids (slmops.training.passes.packing)
_PACKED_PASS = {"lora": "SlmopsLoRA", "qlora": "SlmopsPackedQLoRA"}


@dataclass(frozen=True)
class Sources:
    """Where each stage's data comes from (None where the recipe has no such data)."""

    sft: Optional[DataSource] = None
    sft_eval: Optional[DataSource] = None
    dpo: Optional[DataSource] = None
    dpo_eval: Optional[DataSource] = None


def portable_sources(recipe: Recipe) -> Sources:
    """The data as the recipe names it (hub id + file name), located only when the workflow runs."""

    def named(section, file):
        return DataSource(dataset=section.dataset, file=file, split=section.split)

    d, p = recipe.data, recipe.dpo.data if recipe.dpo else None
    return Sources(
        sft=named(d, d.file) if d else None,
        sft_eval=named(d, d.eval_file) if d and d.eval_file else None,
        dpo=named(p, p.file) if p else None,
        dpo_eval=named(p, p.eval_file) if p and p.eval_file else None,
    )


def render_finetune(recipe: Recipe, model_path: str, sources: Sources, work_dir: str = ".") -> dict:
    """The Olive workflow that trains `model_path` as the recipe says. Pure: same inputs, same dict.

    SFT (Olive's LoRA / QLoRA pass) and DPO (slmops' pass) are entries of one workflow; with
    both, DPO starts from the SFT adapter.
    """
    data_configs, passes = [], {}
    if recipe.data:
        has_eval = bool(recipe.data.eval_split or sources.sft_eval)
        data_configs += [
            _sft_data_config(n, part, recipe, model_path, sources)
            for n, part in (("train_data", "train"), ("eval_data", "eval"))[: 1 + has_eval]
        ]
        passes[SFT_PASS] = _sft_pass(recipe, has_eval, work_dir)
    if recipe.dpo:
        has_eval = bool(recipe.dpo.data.eval_split or sources.dpo_eval)
        data_configs += [
            _preference_data_config(n, part, recipe, sources)
            for n, part in (("dpo_train_data", "train"), ("dpo_eval_data", "eval"))[: 1 + has_eval]
        ]
        passes[DPO_PASS] = _dpo_pass(recipe, has_eval, work_dir)
    load_kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.load_in_8bit:
        # Olive's LoRA pass loads the base with these: the frozen weights in bitsandbytes int8.
        load_kwargs.update(quantization_method="bitsandbytes", quantization_config={"load_in_8bit": True})
    input_model = {"type": "HfModel", "model_path": model_path, "task": "text-generation", "load_kwargs": load_kwargs}
    system = None
    if recipe.system.type != "LocalSystem":
        system = {"type": recipe.system.type, "config": dict(recipe.system.config)}
    return workflow(input_model, passes, work_dir, system=system, data_configs=data_configs)


def _sft_data_config(name: str, part: str, recipe: Recipe, model_path: str, sources: Sources) -> dict:
    d = recipe.data
    assert d is not None and sources.sft is not None  # render_finetune calls this only for a recipe with data
    return {
        "name": name,
        "type": "DataContainer",
        "load_dataset_config": {
            "type": "slmops_sft_dataset",
            "params": {
                "source": _source_dict(sources.sft),
                "format": d.format,
                "part": part,
                "eval_source": _source_dict(sources.sft_eval) if sources.sft_eval else None,
                "eval_split": d.eval_split,
                "max_samples": d.max_samples,
                "dedupe": d.dedupe,
                "seed": recipe.training.seed,
                **({"template": d.template.model_dump(mode="json")} if d.template else {}),
                **({"columns": dict(d.columns)} if d.columns else {}),
            },
        },
        "pre_process_data_config": {
            "type": "slmops_sft_tokenize",
            "params": {
                "model_name": model_path,
                "max_seq_len": d.max_seq_len,
                "chat_template": d.chat_template,
                "train_on": d.train_on,
                **({"packing": True} if recipe.training.packing else {}),
                "trust_remote_code": recipe.model.trust_remote_code,
            },
        },
    }


def _preference_data_config(name: str, part: str, recipe: Recipe, sources: Sources) -> dict:
    assert recipe.dpo is not None and sources.dpo is not None  # render_finetune: only for a recipe with dpo
    p = recipe.dpo.data
    return {
        "name": name,
        "type": "DataContainer",
        "load_dataset_config": {
            "type": "slmops_preference_dataset",
            "params": {
                "source": _source_dict(sources.dpo),
                "part": part,
                "eval_source": _source_dict(sources.dpo_eval) if sources.dpo_eval else None,
                "eval_split": p.eval_split,
                "max_samples": p.max_samples,
                "eval_max_samples": p.eval_max_samples,
                "dedupe": p.dedupe,
                "seed": recipe.training.seed,
                **({"columns": dict(p.columns)} if p.columns else {}),
            },
        },
    }


def _dpo_pass(recipe: Recipe, has_eval: bool, work_dir: str) -> dict:
    dpo, lora = recipe.dpo, recipe.lora
    assert dpo is not None  # render_finetune calls this only for a recipe with dpo
    config = {
        "type": "DPO",
        "train_data_config": "dpo_train_data",
        "beta": dpo.beta,
        "loss_type": list(dpo.loss_type),
        "max_length": dpo.max_length,
        "learning_rate": dpo.learning_rate,
        "lr_scheduler_type": dpo.lr_scheduler,
        "warmup_ratio": dpo.warmup_ratio,  # the pass hands it to TRL as warmup_steps (a ratio when < 1)
        "max_steps": dpo.max_steps,
        "num_train_epochs": dpo.epochs,
        "per_device_train_batch_size": dpo.batch_size,
        "gradient_accumulation_steps": dpo.gradient_accumulation_steps,
        "r": lora.r,
        "alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "torch_dtype": dpo.dtype,
        "quantization": "4bit" if recipe.method == "qlora" else "8bit" if recipe.model.load_in_8bit else None,
        "precompute_ref_log_probs": dpo.precompute_ref_log_probs,
        "share_prompt": dpo.share_prompt,
        "gradient_checkpointing": dpo.gradient_checkpointing,
        "optim": dpo.optimizer,
        "logging_steps": recipe.training.logging_steps,
        "save_steps": dpo.save_steps,
        "output_dir": f"{work_dir}/dpo-checkpoints",
        "seed": recipe.training.seed,
        "extra_args": {**_multi_process_args(recipe), **dpo.extra},
    }
    if recipe.training.report_to:
        config["report_to"] = list(recipe.training.report_to)
    if has_eval:
        config["eval_data_config"] = "dpo_eval_data"
    return config


def _source_dict(source: DataSource) -> dict:
    # The content hash is part of the config, so Olive's cache key changes when the data does.
    return {k: v for k, v in dataclasses.asdict(source).items() if v is not None}


def _sft_pass(recipe: Recipe, has_eval: bool, work_dir: str) -> dict:
    lora, t = recipe.lora, recipe.training
    config = {
        "type": (_PACKED_PASS if t.packing else _OLIVE_PASS)[recipe.method],
        "r": lora.r,
        "alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "torch_dtype": t.dtype,
        "train_data_config": "train_data",
        "training_args": _training_args(recipe, has_eval, work_dir),
    }
    if has_eval:
        config["eval_data_config"] = "eval_data"
    if recipe.method == "qlora":
        q = recipe.qlora
        config.update(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=q.compute_dtype or t.dtype)
    return config


def _training_args(recipe: Recipe, has_eval: bool, work_dir: str) -> dict:
    t = recipe.training
    # Checkpoints carry trainer_state.json (the loss log) and let a run be resumed.
    save = (
        {"save_strategy": "steps", "save_steps": t.save_steps or t.max_steps}
        if t.max_steps > 0
        else {
            "save_strategy": "steps" if t.save_steps else "epoch",
            **({"save_steps": t.save_steps} if t.save_steps else {}),
        }
    )
    args = {
        "output_dir": f"{work_dir}/checkpoints",
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        # transformers 5 has no warmup_ratio (Olive drops it silently); a float < 1 here is a ratio.
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "max_steps": t.max_steps,
        "num_train_epochs": t.epochs,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optim": recipe.optimizer,
        "logging_steps": t.logging_steps,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": list(t.report_to) or "none",
        "save_total_limit": 1,
        "remove_unused_columns": False,
        **save,
    }
    if recipe.distributed.multi_process:
        args["ddp_find_unused_parameters"] = False  # the frozen base has no gradients; DDP must not wait for them
        args.update(_multi_process_args(recipe))
    if has_eval:
        args["eval_strategy"] = "steps" if t.max_steps > 0 else "epoch"
        args["eval_on_start"] = True  # a step-0 eval loss, to show what training changed
        if t.max_steps > 0:
            args["eval_steps"] = t.save_steps or t.max_steps
    return args


def _multi_process_args(recipe: Recipe) -> dict:
    """Trainer settings for several processes: each machine keeps its own copy of every checkpoint (so each
    resumes without a shared disk), and a collective waits at most distributed.timeout for a silent peer."""
    if not recipe.distributed.multi_process:
        return {}
    args: dict = {"save_on_each_node": True}
    if recipe.distributed.num_machines > 1:  # on one machine, the trainers' own (30 min) default stays
        # the two newest checkpoints: a machine killed mid-save still shares the one before with the others
        args.update(ddp_timeout=max(int(recipe.distributed.timeout), 10), save_total_limit=2)
    return args


def validate(config: dict) -> None:
    """Have Olive check a fine-tune's workflow config (what --dry-run does), with slmops' data components known."""
    import slmops.training.olive_data  # noqa: F401 - registers the data components the config names

    validate_with_olive(config)


# ---------------------------------------------------------------------------------------------
# Golden configs: olive_configs/<recipe>.json, the portable rendering of every shipped recipe


def render_portable(recipe: Recipe) -> dict:
    """The config a user with the hub could run anywhere: hub ids, no local paths or hashes."""
    from slmops.core.models import portable_name

    return render_finetune(recipe, portable_name(recipe.model.name), portable_sources(recipe))


def golden_text(recipe_path: Path) -> str:
    from slmops.training.recipe import load_recipe

    return json.dumps(render_portable(load_recipe(str(recipe_path))), indent=2) + "\n"


def write_golden_configs(recipes: Path, configs: Path) -> list[Path]:
    configs.mkdir(exist_ok=True)
    written = []
    for recipe_path in sorted(recipes.glob("*.yaml")):
        out = configs / f"{recipe_path.stem}.json"
        out.write_text(golden_text(recipe_path))
        written.append(out)
    return written


def drifted_configs(recipes: Path, configs: Path) -> list[str]:
    """Names of recipes whose golden config is missing, stale, or has no recipe any more."""
    names = {p.stem for p in recipes.glob("*.yaml")} | {p.stem for p in configs.glob("*.json")}
    drifted = []
    for name in sorted(names):
        recipe_path, config_path = recipes / f"{name}.yaml", configs / f"{name}.json"
        if not (recipe_path.is_file() and config_path.is_file()):
            drifted.append(name)
        elif config_path.read_text() != golden_text(recipe_path):
            drifted.append(name)
    return drifted
