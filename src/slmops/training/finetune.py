"""Run a recipe's fine-tune through Olive and collect the adapter, the configs and the loss log.

Output folder (built in `.slmops-partial-<name>` next to it, renamed into place when complete; a
run that is interrupted after its first checkpoint leaves that folder, and `--resume` continues it):
    adapter/            the PEFT adapter (no copy of the base model)
    recipe.yaml         the resolved recipe
    olive_config.json   the exact Olive workflow config that ran
    training_log.jsonl  one line per logged step (loss, learning rate, ...)
    run.json            summary: steps, losses, time, model, data hashes, versions
    tensorboard/<stage> TensorBoard event files (with --report-to tensorboard)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from slmops.core.architectures import check_targets
from slmops.core.errors import RunError
from slmops.core.files import resumable_dir
from slmops.core.models import ResolvedModel, model_fingerprint, resolve_model
from slmops.core.workflows import run_workflow, verbose
from slmops.training import data as data_mod
from slmops.training import distributed
from slmops.training.olive_config import SFT_PASS, Sources, render_finetune, validate
from slmops.training.outputs import complete_checkpoints, has_checkpoint
from slmops.training.recipe import BNB_OPTIMIZERS, Recipe, recipe_to_yaml
from slmops.training.tracking import check_trackers, keep_tensorboard_logs, tracker_environment

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything resolved before any training starts."""

    recipe: Recipe
    model: ResolvedModel
    sources: Sources
    counts: dict[str, tuple[int, int]]  # stage -> (train examples, eval examples)
    topology: Optional[distributed.Topology] = None  # several processes: where this machine stands


@dataclass
class StageResult:
    """What one training stage (sft or dpo) did, read from its trainer log."""

    steps: int = 0
    first_loss: Optional[float] = None  # mean of the first few logged steps (one step is noisy)
    final_loss: Optional[float] = None  # mean of the last few logged steps
    loss_window: int = 0
    eval_loss_start: Optional[float] = None  # before any training (eval_on_start)
    eval_loss: Optional[float] = None
    train_metrics: dict = field(default_factory=dict)  # means over the last window (DPO rewards, ...)
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation
    eval_metrics_start: dict = field(default_factory=dict)
    train_seconds: Optional[float] = None  # the trainer's own train_runtime (no loading or data prep)
    tokens: Optional[int] = None  # tokens trained on, where the trainer counts them (TRL)


@dataclass
class FinetuneResult:
    output_dir: str
    adapter_dir: Optional[str]
    dry_run: bool
    counts: dict[str, tuple[int, int]]
    stages: dict[str, StageResult] = field(default_factory=dict)
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)
    machine: Optional[tuple[int, int]] = None  # (rank, machines) with several machines
    launch: Optional[list[str]] = None  # this machine's launcher command, with several processes


def plan(recipe: Recipe) -> Plan:
    """Resolve the model and data and validate every row, so bad input fails before training."""
    check_bitsandbytes(recipe)
    sources, counts = Sources(), {}
    if recipe.data:
        sft, sft_eval, train, held = data_mod.load_section(recipe.data, "sft", recipe.training.seed)
        sources = replace(sources, sft=sft, sft_eval=sft_eval)
        counts["sft"] = (len(train), len(held))
    if recipe.dpo:
        dpo, dpo_eval, train, held = data_mod.load_section(recipe.dpo.data, "preference", recipe.training.seed)
        sources = replace(sources, dpo=dpo, dpo_eval=dpo_eval)
        counts["dpo"] = (len(train), len(held[: recipe.dpo.data.eval_max_samples]))
    model = resolve_model(recipe.model.name)
    check_targets(model.path, recipe.lora.target_modules)  # export must take the adapter: refuse now, not after
    topology = None
    if recipe.distributed.multi_process:
        topology = distributed.topology(recipe.distributed)
        distributed.check_strategy(recipe.distributed)
    return Plan(recipe, model, sources, counts, topology)


def check_bitsandbytes(recipe: Recipe) -> None:
    """QLoRA, 8-bit LoRA and paged / 8-bit optimizers run on bitsandbytes: refuse early when it is missing."""
    needs = []
    if recipe.method == "qlora":
        needs.append(("method: qlora", "use method: lora (--set method=lora)"))
    if recipe.model.load_in_8bit:
        needs.append(("model.load_in_8bit", "drop it (--set model.load_in_8bit=false)"))
    for key, name in (
        ("training.optimizer", recipe.optimizer if recipe.data else None),
        ("dpo.optimizer", recipe.dpo.optimizer if recipe.dpo else None),
    ):
        if name in BNB_OPTIMIZERS:
            needs.append((f"{key} {name}", f"choose adamw_torch (--set {key}=adamw_torch)"))
    if not needs:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        what, fix = needs[0]
        raise RunError(
            f"{what} needs bitsandbytes, which is not usable here; install it with "
            f"`pip install 'slmops[qlora]'`, or {fix}"
        ) from None


def finetune(recipe: Recipe, output_dir: Path, dry_run: bool = False, resume: bool = False) -> FinetuneResult:
    """Plan, render the Olive config, run it (unless dry_run) and write the output folder.

    resume: continue the interrupted run for output_dir from its last checkpoint (the recipe, model
    and data must be the same; their hashes are compared, as Olive's cache would not notice).
    """
    p = plan(recipe)
    check_trackers(recipe.training.report_to)
    rank = p.topology.rank if p.topology and not dry_run else 0
    target = output_dir if rank == 0 else node_folder(output_dir, rank)
    with resumable_dir(target, resume, keep=has_checkpoint, publish=rank == 0) as tmp:
        work = tmp / "work"
        config = render_finetune(recipe, str(p.model.path), p.sources, work_dir=str(work))
        identity = {"olive_config": config, "data": asdict(p.sources), "model": model_fingerprint(p.model.path)}
        if resume:
            _check_same_run(tmp, identity)
            _drop_incomplete_checkpoints(work)
        if verbose():  # slmops --verbose: Olive's INFO log too (recorded as it ran)
            config = dict(config, log_severity_level=1)
        validate(config)
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (tmp / "olive_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / _IDENTITY).write_text(json.dumps(identity, indent=2) + "\n")
        result = FinetuneResult(str(output_dir), None, dry_run, p.counts)
        if p.topology:
            result.machine = (p.topology.rank, p.topology.machines) if p.topology.machines > 1 else None
            result.launch = distributed.launch_command(
                work / "olive_config.distributed.json", recipe.distributed, p.topology
            )
        if not dry_run:
            _train(p, config, tmp, result, node_identity(recipe, p, work))
        if rank:
            return result  # machine 0 writes the output; this machine's work folder goes
        (tmp / "run.json").write_text(json.dumps(_run_record(p, result), indent=2) + "\n")
        (tmp / _IDENTITY).unlink()
    return result


def node_folder(output_dir: Path, rank: int) -> Path:
    """Where machine `rank` (> 0) of a multi-node run keeps its work: beside the output, so that machines
    sharing a disk (and the same -o) do not collide; removed once the run is done."""
    output_dir = Path(output_dir).absolute()
    return output_dir.with_name(f"{output_dir.name}.machine-{rank}")


def node_identity(recipe: Recipe, p: Plan, work: Path) -> dict:
    """What a machine is about to train, compared across machines before launch (slmops.training.checkin)."""
    import hashlib

    same = recipe.model_dump(mode="json")  # blank what may differ per machine: paths and ranks (data: by sha256)
    same["model"]["name"], same["distributed"]["machine_rank"], same["distributed"]["config_file"] = "", 0, None
    for section in (same.get("data"), (same.get("dpo") or {}).get("data")):
        if section:
            section["file"] = section["eval_file"] = None
    return {
        "recipe": hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest(),
        "data": {stage: source["sha256"] or source["dataset"] for stage, source in asdict(p.sources).items() if source},
        "model": model_fingerprint(p.model.path),
        "checkpoints": sorted([c.parent.name, step] for c, step in complete_checkpoints(work)),
    }


_IDENTITY = "resume-check.json"  # what --resume compares: the Olive config, data hashes, model fingerprint


def _drop_incomplete_checkpoints(work: Path) -> None:
    """A kill during a save leaves a checkpoint without its trainer_state.json (written last), which
    the trainer would pick as the newest and fail on; the previous, complete one is still there."""
    for checkpoint in work.glob("*/checkpoint-*"):
        state = checkpoint / "trainer_state.json"
        try:
            json.loads(state.read_text())
        except (OSError, ValueError):
            logger.info("Removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)


def _check_same_run(partial: Path, identity: dict) -> None:
    recorded = partial / _IDENTITY
    if not recorded.is_file():
        raise RunError(f"{partial} has no record of its run to resume; delete it to start over")
    before = json.loads(recorded.read_text())
    labels = {"olive_config": "recipe (its Olive config)", "data": "data files", "model": "model weights"}
    changed = [label for what, label in labels.items() if before.get(what) != json.loads(json.dumps(identity[what]))]
    if changed:
        raise RunError(
            f"--resume: the {' and the '.join(changed)} changed since the interrupted run; resume with "
            f"the same recipe, flags and data, or delete {partial} to start over"
        )


def _train(p: Plan, config: dict, tmp: Path, result: FinetuneResult, identity: dict) -> None:
    import slmops.training.olive_data  # noqa: F401 - registers slmops' data components with Olive

    start = time.monotonic()
    with tracker_environment(p.recipe.training.report_to, p.recipe.name or "slmops"):
        if p.topology:
            distributed.run(config, tmp / "work", p.recipe.distributed, p.topology, identity)
            workflow = None  # each rank ran run_workflow; rank 0's output is in the workflow's output folder
        else:
            workflow = run_workflow(config, tmp / "work" / "cwd", "Olive's fine-tune failed")
    result.seconds = round(time.monotonic() - start, 1)
    if p.topology and p.topology.rank:
        return  # global rank 0 is on machine 0: the adapter and the log are there
    adapter = _find_adapter(workflow, Path(config["output_dir"]))
    shutil.copytree(adapter, tmp / "adapter")
    result.adapter_dir = str(Path(result.output_dir) / "adapter")
    for stage in p.recipe.stages:
        log = [dict(entry, stage=stage) for entry in _loss_log(_checkpoints(config, stage))]
        result.log += log
        result.stages[stage] = summarise(log)
        keep_tensorboard_logs(_checkpoints(config, stage), tmp / "tensorboard" / stage)
    with open(tmp / "training_log.jsonl", "w") as fh:
        for entry in result.log:
            fh.write(json.dumps(entry) + "\n")
    shutil.rmtree(tmp / "work", ignore_errors=True)  # Olive's cache, its copy of the model, checkpoints


def _checkpoints(config: dict, stage: str) -> Path:
    pass_config = config["passes"][stage]
    return Path(pass_config["training_args"]["output_dir"] if stage == SFT_PASS else pass_config["output_dir"])


def _find_adapter(workflow, olive_output: Path) -> Path:
    """The adapter folder Olive produced: the best candidate's, else the one in Olive's output folder."""
    best = workflow.get_best_candidate() if workflow is not None else None
    if best is not None:
        adapter = (best.model_config.get("config") or {}).get("adapter_path")
        if adapter and (Path(adapter) / "adapter_config.json").is_file():
            return Path(adapter)
    found = sorted(olive_output.rglob("adapter_config.json"))
    if not found:
        raise RunError("Olive finished without producing an adapter; rerun with --verbose to see Olive's log")
    return found[0].parent


def _loss_log(checkpoints: Path) -> list[dict]:
    full = checkpoints / "log_history.json"  # written by slmops' DPO pass; Olive's LoRA has only checkpoints
    if full.is_file():
        return [e for e in json.loads(full.read_text()) if {"loss", "eval_loss", "train_runtime"} & set(e)]
    states = sorted(checkpoints.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    history = json.loads(states[-1].read_text()).get("log_history", [])
    return [entry for entry in history if {"loss", "eval_loss", "train_runtime"} & set(entry)]


def summarise(log: list[dict]) -> StageResult:
    """Losses and metrics of one stage from its trainer log (train entries have 'loss')."""
    result = StageResult()
    train = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval_loss" in e]
    if train:
        window = max(1, min(5, len(train) // 4))
        result.loss_window = window
        result.first_loss = _mean(e["loss"] for e in train[:window])
        result.final_loss = _mean(e["loss"] for e in train[-window:])
        result.steps = int(train[-1].get("step", len(train)))
        keys = [k for k in train[-1] if k.startswith(("rewards/", "logps/")) or k == "loss"]
        result.train_metrics = {k: _mean(e[k] for e in train[-window:] if k in e) for k in keys}
    counted = [e["num_tokens"] for e in train if "num_tokens" in e]
    result.tokens = int(counted[-1]) if counted else None
    final = [e for e in log if "train_runtime" in e]
    result.train_seconds = round(final[-1]["train_runtime"], 2) if final else None
    if evals:
        result.eval_loss = round(evals[-1]["eval_loss"], 4)
        result.eval_metrics = _eval_metrics(evals[-1])
        if len(evals) > 1 and evals[0].get("step", 0) == 0:
            result.eval_loss_start = round(evals[0]["eval_loss"], 4)
            result.eval_metrics_start = _eval_metrics(evals[0])
    return result


def _eval_metrics(entry: dict) -> dict:
    return {
        k[len("eval_") :]: round(v, 4)
        for k, v in entry.items()
        if k.startswith("eval_") and isinstance(v, (int, float)) and "runtime" not in k and "per_second" not in k
    }


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")


def _run_record(p: Plan, result: FinetuneResult) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("slmops", "olive-ai", "torch", "transformers", "peft", "trl", "datasets"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    record = {k: v for k, v in asdict(result).items() if k != "log"}
    record.update(
        recipe=p.recipe.name,
        method=p.recipe.method,
        model={
            "name": p.model.name,
            "source": p.model.source,
            "hub_id": p.model.hub_id,
            "path": str(p.model.path),
            "sha256": model_fingerprint(p.model.path),
        },
        data={k: v for k, v in asdict(p.sources).items() if v},
        versions=versions,
    )
    return record
