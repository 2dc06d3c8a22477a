"""The recipe: a typed, validated description of one fine-tune (model, data, method, training).

Precedence: schema defaults < recipe file < CLI flags < ``--set key=value`` overrides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmops.core.choices import (
    AccuracyLevel,
    BlockSize,
    Int4Algo,
    KvCache,
    LrScheduler,
    PrecisionChoice,
    Target,
    Tracker,
    TrainOn,
)
from slmops.core.errors import RecipeError
from slmops.core.models import DEFAULT_MODEL

Dtype = Literal["bfloat16", "float16", "float32"]
SftFormat = Literal["auto", "alpaca", "input_output", "prompt_completion", "messages", "text", "template"]
# transformers' optimizer names; paged / 8-bit ones come from bitsandbytes.
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adamw_bnb_8bit",
    "paged_lion_32bit",
]
BNB_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_lion_32bit")
# A split with an optional slice, as `datasets` writes it: train, train[:2000], train[10%:20%], test[-500:]
SPLIT_PATTERN = r"^[A-Za-z_][\w.-]*(\[-?\d*%?:-?\d*%?\])?$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        DEFAULT_MODEL,
        description="Alias (smollm2-135m-instruct, embedded), local Hugging Face folder, or hub id.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")
    load_in_8bit: bool = Field(
        False, description="Freeze the base in bitsandbytes int8 (8-bit LoRA; needs bitsandbytes)."
    )


class DataSourceSection(Section):
    """Where a stage's rows come from, and which of them it trains on."""

    dataset: Optional[str] = Field(
        None, description="Hub dataset id: the portable name, used when `file` is not found locally."
    )
    file: Optional[str] = Field(
        None,
        description="Data file (json, jsonl, csv, parquet): a path, or a name looked up in $SLMOPS_DATA_DIR, "
        "or a file inside `dataset` on the hub.",
    )
    split: str = Field(
        "train",
        description="Split to read, with an optional slice as "
        "`datasets` writes it (train[:2000], train[10%:]); a local file is the train split.",
    )
    eval_split: Optional[Union[float, str]] = Field(
        None,
        description="Held-out rows for evaluation, never trained on: a fraction (0.1, seeded), or a "
        "split slice (train[2000:2200]) that must not overlap `split`.",
    )
    eval_file: Optional[str] = Field(None, description="A separate evaluation file (same lookup as `file`).")
    max_samples: Optional[int] = Field(None, ge=1, description="Use at most this many training rows.")
    dedupe: bool = Field(True, description="Drop exact duplicate rows.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Read a column under another name: {slmops name: data set column}, "
        "e.g. {prompt: question} for pairs whose prompt column is `question`.",
    )

    @field_validator("split")
    @classmethod
    def _check_split(cls, value):
        if not re.match(SPLIT_PATTERN, value):
            raise ValueError("expected a split name with an optional slice, such as train, train[:2000] or train[90%:]")
        return value

    @field_validator("eval_split")
    @classmethod
    def _check_eval_split(cls, value):
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a fraction must be between 0 and 1 (exclusive), e.g. 0.1")
        if isinstance(value, str) and not re.match(SPLIT_PATTERN, value):
            raise ValueError("expected a fraction (0.1) or a split slice such as train[2000:2200]")
        return value

    @model_validator(mode="after")
    def _check_source(self):
        if not self.dataset and not self.file:
            raise ValueError("needs `file` (a data file) or `dataset` (a hub dataset id)")
        if self.eval_split and self.eval_file:
            raise ValueError("set either eval_split or eval_file, not both")
        return self


class TemplateSection(Section):
    """Rows of any columns made into prompt/completion text, e.g. classification as generation."""

    prompt: str = Field(description="Prompt text with {column} fields, e.g. 'Classify: {sentence}'.")
    completion: str = Field(description="Answer text with {column} fields, e.g. '{label}'.")
    value_names: dict[str, dict[Union[int, str], str]] = Field(
        default_factory=dict, description="Per column, names for raw values, e.g. {label: {0: negative, 1: positive}}."
    )

    @model_validator(mode="after")
    def _check_fields(self):
        from string import Formatter

        for text in (self.prompt, self.completion):
            try:
                fields = [name for _, name, _, _ in Formatter().parse(text) if name is not None]
            except ValueError as exc:
                raise ValueError(
                    f"template {text!r}: {exc}; write columns as {{column}} and braces as {{{{ }}}}"
                ) from None
            if any(not f.isidentifier() for f in fields):
                raise ValueError(f"template {text!r}: fields must be plain column names such as {{text}}")
        return self


class DataSection(DataSourceSection):
    """SFT data."""

    format: SftFormat = Field(
        "auto", description="Row format; auto detects it from the columns (template with `template`)."
    )
    template: Optional[TemplateSection] = Field(
        None, description="Build prompt/completion from columns (format: template)."
    )
    chat_template: bool = Field(True, description="Format prompts with the model's chat template if it has one.")
    train_on: TrainOn = Field(
        "all_assistant",
        description="Which assistant turns of a conversation are trained: every one (with its end-of-turn "
        "token), or only the last. System, user and tool text never are.",
    )
    max_seq_len: int = Field(
        512, ge=16, description="Tokens per example; longer conversations lose whole early exchanges first."
    )

    @model_validator(mode="after")
    def _check_template(self):
        if self.template is not None and self.format == "auto":
            self.format = "template"
        if (self.format == "template") != (self.template is not None):
            raise ValueError("format: template and a `template` section go together; set both or neither")
        return self


class PreferenceDataSection(DataSourceSection):
    """Preference pairs: prompt/chosen/rejected, or chosen/rejected transcripts with an implicit prompt."""

    eval_max_samples: Optional[int] = Field(
        None,
        ge=1,
        description="Evaluate on at most this many held-out pairs during training "
        "(the rest stay held out for `slmops eval`).",
    )


class DpoSection(Section):
    data: PreferenceDataSection
    beta: float = Field(0.1, gt=0, description="KL strength: how far the policy may move from the reference.")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], min_length=1, description="TRL DPO loss type(s).")
    max_length: int = Field(
        512, ge=16, description="Tokens per prompt + answer; prompts lose their oldest turns first."
    )
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: LrScheduler = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(2, ge=1, le=4096, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    dtype: Dtype = Field("bfloat16", description="Autocast dtype over fp32 weights (float32 = no autocast).")
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once, before training.")
    share_prompt: bool = Field(
        True,
        description="Run each pair's common prefix (its prompt) once: the same loss, fewer tokens through the model.",
    )
    gradient_checkpointing: bool = False
    optimizer: Optimizer = Field("adamw_torch", description="Optimizer (paged / 8-bit ones need bitsandbytes).")
    save_steps: Optional[int] = Field(None, ge=1, description="Checkpoint every N steps (default: at the end).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Extra TRL DPOConfig keys, passed through.")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names that get LoRA."
    )


class QLoraSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit type of the frozen base.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    compute_dtype: Optional[Dtype] = Field(None, description="Compute dtype; defaults to training.dtype.")


class TrainingSection(Section):
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is -1.")
    batch_size: int = Field(2, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    packing: bool = Field(
        False,
        description="SFT: pack examples into rows of data.max_seq_len (best fit), each attending only to "
        "itself; batch_size then counts rows.",
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate (AdamW).")
    lr_scheduler: LrScheduler = "constant"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    dtype: Dtype = Field("bfloat16", description="Training dtype (float16 means fp16 mixed precision).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    optimizer: Optional[Optimizer] = Field(
        None,
        description="Optimizer; default adamw_torch for lora, paged_adamw_32bit for qlora (Olive's QLoRA default).",
    )
    logging_steps: int = Field(1, ge=1, description="Log the loss every N steps.")
    report_to: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers the trainers log to (opt-in; none by default)."
    )
    save_steps: Optional[int] = Field(None, ge=1, description="Checkpoint every N steps (default: at the end).")
    seed: int = Field(42, ge=0)


class DistributedSection(Section):
    """Data-parallel training under Hugging Face accelerate (or torchrun), on one machine or several.

    Every machine runs the same command with its own machine_rank; only global rank 0 writes the output.
    An accelerate config file's own num_processes / num_machines / machine_rank / main_process_ip /
    main_process_port hold where these keys are not set."""

    num_processes: int = Field(
        1, ge=1, le=65536, description="Training processes in all, over every machine (one per GPU; on CPU, gloo)."
    )
    num_machines: int = Field(1, ge=1, le=4096, description="Machines (nodes) taking part.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank, 0 to num_machines - 1; 0 writes the output.")
    main_address: Optional[str] = Field(
        None,
        description="HOST:PORT of machine 0, needed with several machines. slmops' own check-in uses PORT, "
        "the launcher's rendezvous PORT + 1.",
    )
    timeout: float = Field(
        120.0,
        gt=0,
        le=86400,
        description="Seconds a machine waits for the others (joining, or silent) before all stop.",
    )
    launcher: Literal["accelerate", "torchrun"] = Field(
        "accelerate", description="What starts the training processes on each machine."
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp; fsdp and deepspeed take their settings from an accelerate config file."
    )
    config_file: Optional[str] = Field(
        None, description="accelerate config file (`accelerate config`), passed through."
    )
    main_process_port: Optional[int] = Field(
        None, ge=1024, le=65535, description="Rendezvous port on one machine (default: a free one)."
    )

    @model_validator(mode="after")
    def _check_strategy(self):
        if self.strategy != "ddp" and not self.config_file:
            raise ValueError(
                f"strategy {self.strategy} needs config_file: an accelerate config file with its "
                "settings (write one with `accelerate config`)"
            )
        if self.strategy != "ddp" and self.launcher == "torchrun":
            raise ValueError(f"strategy {self.strategy} is set up by accelerate; use launcher: accelerate")
        if self.main_address is not None:
            host, _, port = self.main_address.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) < 65535:
                raise ValueError(f"main_address {self.main_address!r} is not HOST:PORT (a port below 65535)")
        return self

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1 or self.config_file is not None


class SystemSection(Section):
    """Where Olive runs the workflow: this machine, a Docker image, or another Python environment."""

    type: Literal["LocalSystem", "Docker", "PythonEnvironment", "AzureML"] = "LocalSystem"
    config: dict[str, Any] = Field(
        default_factory=dict, description="Olive's settings for that system, passed through."
    )

    @model_validator(mode="after")
    def _check_type(self):
        if self.type == "AzureML":
            raise ValueError(
                "olive-ai 0.13 has no AzureML system (it was removed); run in a Docker image "
                "(type: Docker) or a Python environment on the Azure machine instead"
            )
        return self


class ExportSection(Section):
    target: Target = Field("cpu", description="Hardware the bundle is built for.")
    precision: PrecisionChoice = Field(
        "int4", description="Precision of the base weights; auto: the fastest candidate that meets min_agreement."
    )
    min_agreement: Optional[float] = Field(
        None,
        ge=0,
        le=1,
        description="precision auto: the top-1 agreement with PyTorch fp32 every row must reach (default 0.9).",
    )
    int4_algo: Int4Algo = Field(
        "auto",
        description="int4 method: gguf keeps a GGUF-quantized source's blocks exactly; the model builder's "
        "k_quant_mixed puts some layers and lm_head in int8; auto: gguf where the weights are on a GGUF grid, else "
        "k_quant_mixed.",
    )
    float_layers: list[int] = Field(
        default_factory=list, description="int4 gguf: decoder layers kept in fp32 (the most sensitive ones)."
    )
    block_size: BlockSize = Field(32, description="Quantization block size.")
    accuracy_level: AccuracyLevel = Field(4, description="MatMulNBits accuracy level (4: int8 compute).")
    kv_cache: Optional[KvCache] = Field(
        None, description="Element type of the KV cache (default: the target's, chosen by measurement)."
    )
    lora_modules: Optional[list[str]] = Field(
        None, description="Modules that get LoRA inputs in the graph (default: those the adapters train)."
    )


# Recipe keys a sweep may vary, and the type of their values.
SEARCHABLE: dict[str, type] = {
    "training.learning_rate": float,
    "training.batch_size": int,
    "training.gradient_accumulation_steps": int,
    "training.warmup_ratio": float,
    "training.weight_decay": float,
    "training.lr_scheduler": str,
    "lora.r": int,
    "lora.alpha": float,
    "lora.dropout": float,
    "dpo.beta": float,
    "dpo.learning_rate": float,
    "dpo.batch_size": int,
}
Objective = Literal["eval_loss", "preference_accuracy"]


class SearchRange(Section):
    """A numeric range, tried at `steps` evenly spaced points (log-spaced with log: true)."""

    min: float
    max: float
    steps: int = Field(3, ge=2, le=50, description="Points tried in the range, ends included.")
    log: bool = Field(False, description="Space the points evenly on a log scale (learning rates).")

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.min >= self.max:
            raise ValueError("min must be below max")
        if self.log and self.min <= 0:
            raise ValueError("a log range needs min > 0")
        return self

    def points(self, kind: type) -> list:
        import math

        lo, hi = (math.log(self.min), math.log(self.max)) if self.log else (self.min, self.max)
        values = [lo + (hi - lo) * i / (self.steps - 1) for i in range(self.steps)]
        values = [math.exp(v) if self.log else v for v in values]
        return sorted({int(round(v)) for v in values}) if kind is int else [float(f"{v:.6g}") for v in values]


class SearchSection(Section):
    """Hyper-parameter search for `slmops sweep`, run by Olive's search strategy and samplers."""

    sampler: Literal["random", "grid", "tpe"] = Field(
        "tpe", description="tpe: Olive's optuna TPE sampler; random; grid: every point in order."
    )
    trials: int = Field(8, ge=1, le=10000, description="Trials to run (`slmops sweep --trials` overrides).")
    objective: Optional[Objective] = Field(
        None,
        description="Metric to optimise on held-out data: eval_loss (lower is better) or "
        "preference_accuracy (DPO reward accuracy, higher is better); default: preference_accuracy with dpo.",
    )
    seed: int = Field(0, ge=0, description="Seed of the sampler.")
    space: dict[str, Union[list[Union[int, float, str]], SearchRange]] = Field(
        min_length=1, description="Recipe key -> values to try (a list) or a range {min, max, steps, log}."
    )

    @field_validator("space")
    @classmethod
    def _check_space(cls, space):
        for key, values in space.items():
            if key not in SEARCHABLE:
                raise ValueError(f"{key} cannot be searched; searchable keys: {', '.join(SEARCHABLE)}")
            if isinstance(values, list) and not values:
                raise ValueError(f"{key}: give at least one value")
            if isinstance(values, SearchRange) and SEARCHABLE[key] is str:
                raise ValueError(f"{key}: a range needs a numeric key; list the values instead")
        return space

    def choices(self) -> dict[str, list]:
        """Every searched key with the values to try."""
        return {
            key: values.points(SEARCHABLE[key]) if isinstance(values, SearchRange) else list(values)
            for key, values in self.space.items()
        }


class Recipe(Section):
    name: Optional[str] = Field(None, description="Recipe name; defaults to the file name.")
    description: Optional[str] = None
    method: Literal["lora", "qlora"] = Field("lora", description="lora, or qlora (4-bit base, needs bitsandbytes).")
    model: ModelSection = Field(default_factory=ModelSection)
    data: Optional[DataSection] = Field(None, description="SFT data; with `dpo` too, SFT runs first.")
    lora: LoraSection = Field(default_factory=LoraSection)
    qlora: QLoraSection = Field(default_factory=QLoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    dpo: Optional[DpoSection] = Field(None, description="Preference tuning (after SFT when `data` is set).")
    export: ExportSection = Field(default_factory=ExportSection, description="How `slmops export` builds the bundle.")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Multi-process training.")
    system: SystemSection = Field(default_factory=SystemSection, description="The Olive system the workflow runs on.")
    search: Optional[SearchSection] = Field(None, description="Hyper-parameter search for `slmops sweep`.")

    @model_validator(mode="after")
    def _check_stages(self):
        if self.data is None and self.dpo is None:
            raise ValueError("nothing to train: add a `data` section (SFT) and/or a `dpo` section (preference tuning)")
        if self.method == "qlora" and self.model.load_in_8bit:
            raise ValueError("method qlora loads the base in 4 bits; drop model.load_in_8bit, or use method: lora")
        if self.search is not None:
            self._check_search(self.search)
        if self.distributed.multi_process and self.system.type != "LocalSystem":
            raise ValueError(
                "distributed training runs on this machine; drop the `system` section or set "
                "distributed.num_processes: 1"
            )
        return self

    def _check_search(self, search: SearchSection) -> None:
        for key in search.space:
            if key.startswith("dpo.") and self.dpo is None:
                raise ValueError(f"search.space: {key} needs a `dpo` section")
            if key.startswith("training.") and self.data is None:
                raise ValueError(
                    f"search.space: {key} sets SFT training, and this recipe has no `data` (SFT) "
                    "section; search dpo.* keys instead"
                )
        if search.objective == "preference_accuracy" and self.dpo is None:
            raise ValueError("search.objective preference_accuracy needs a `dpo` section; use eval_loss")

    @property
    def objective(self) -> Optional[str]:
        """The metric a sweep optimises: the recipe's, else preference accuracy with DPO, else eval loss."""
        if self.search is None:
            return None
        return self.search.objective or ("preference_accuracy" if self.dpo else "eval_loss")

    @property
    def optimizer(self) -> str:
        return self.training.optimizer or ("paged_adamw_32bit" if self.method == "qlora" else "adamw_torch")

    @property
    def stages(self) -> list[str]:
        return [name for name, section in (("sft", self.data), ("dpo", self.dpo)) if section is not None]


# ---------------------------------------------------------------------------------------------
# Loading

UNSET = object()  # a CLI flag value that clears a recipe key (None means "flag not given")


def recipe_dirs() -> list[Path]:
    """Where shipped recipes are looked up: ./recipes, then the ones installed with slmops (the repository's
    recipes/ is packaged as slmops/recipes/ in a wheel), then a source checkout's recipes/."""
    package = Path(__file__).resolve().parents[1]  # src/slmops, or site-packages/slmops
    dirs = [Path.cwd() / "recipes", package / "recipes", package.parents[1] / "recipes"]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def shipped_recipes() -> list[Path]:
    """Every shipped recipe once, by name: the first folder of recipe_dirs() that has it wins."""
    seen: set[str] = set()
    found = []
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem not in seen:
                seen.add(path.stem)
                found.append(path)
    return found


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for folder in recipe_dirs():
        for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    raise RecipeError(f"recipe '{name_or_path}' not found; pass a YAML file path or a name from `slmops recipes list`")


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path}: not UTF-8 text; save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise RecipeError(f"recipe {path}: invalid YAML{where}: {problem}; fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections (model, data, ...) at the top level")
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """Turn ``a.b=value`` into (["a", "b"], value); the value is read as YAML (numbers, lists, ...)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(f"--set {item!r}: expected key=value with a dotted key, e.g. --set lora.r=16")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            dotted, parent = ".".join(keys), ".".join(keys[: i + 1])
            raise RecipeError(f"--set {dotted}: '{parent}' is not a section; set a key inside a section")
        node = child
    node[keys[-1]] = value


def build_recipe(raw: dict[str, Any], source: str, overrides: Sequence[tuple[list[str], Any]] = ()) -> Recipe:
    """Validate a raw mapping (with overrides applied) into a Recipe, or raise one RecipeError."""
    for keys, value in overrides:
        apply_override(raw, keys, value)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"recipe {source}: {format_validation_error(exc)}") from None


def load_recipe(name_or_path: str, flags: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> Recipe:
    """Load a recipe file, apply CLI flags (dotted key -> value) then --set overrides, validate."""
    path = find_recipe(name_or_path)
    raw = read_recipe_file(path)
    overrides = [
        (key.split("."), None if value is UNSET else value) for key, value in (flags or {}).items() if value is not None
    ]
    overrides += [parse_override(item) for item in sets]
    recipe = build_recipe(raw, str(path), overrides)
    if recipe.name is None:
        recipe.name = path.stem
    return recipe


def format_validation_error(exc: ValidationError) -> str:
    """All problems at once, as 'field.path: message' joined on one line."""
    problems = []
    for err in exc.errors():
        loc = ".".join(_key(p) for p in err["loc"]) or "recipe"
        if err["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key ({_known_keys_hint(err['loc'])})")
        elif err["type"] == "missing":
            problems.append(f"{loc}: required key is missing")
        else:
            problems.append(f"{loc}: {' '.join(err['msg'].split())}")
    return "; ".join(problems)


def _key(part) -> str:
    """A key as the user would recognise it: quoted when it has spaces, newlines or other oddities."""
    text = str(part)
    return text if text.isprintable() and text.strip() == text and text and " " not in text else repr(text)


def _known_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        section = _section_type(getattr(field, "annotation", None))
        if section is None:
            return "check the spelling"
        model = section
    return "known keys: " + ", ".join(model.model_fields)


def _section_type(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model inside an annotation such as `DpoSection` or `Optional[DpoSection]`."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in), as written next to every run's outputs."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_needs_hub(recipe: Recipe) -> bool:
    """The hub is used only when the user named something that exists nowhere but on the hub."""
    from slmops.core.models import needs_hub
    from slmops.training.data import find_local

    if needs_hub(recipe.model.name):
        return True
    sections = [recipe.data, recipe.dpo.data if recipe.dpo else None]
    return any(s is not None and s.dataset and not (s.file and find_local(s.file)) for s in sections)


def prepare_environment(recipe: Recipe) -> None:
    """Telemetry off, and the hub offline unless the recipe names something only the hub has."""
    from slmops.core.privacy import go_offline

    go_offline(allow_hub=recipe_needs_hub(recipe))


def data_overrides(data: str | None) -> dict:
    """`-d DATA` as recipe overrides: a hub dataset id sets data.dataset, anything else data.file."""
    if data is None:
        return {}
    from slmops.core.models import needs_hub

    if needs_hub(data):
        return {"data.dataset": data, "data.file": UNSET}
    return {"data.file": data, "data.dataset": UNSET}
