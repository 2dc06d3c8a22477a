"""`slmops sweep`: hyper-parameter search over a recipe, driven by Olive's search strategy.

Olive's SearchStrategy and its samplers (random, sequential for grid, tpe on optuna) propose each
trial's values from the recipe's `search.space`. A trial is an ordinary slmops fine-tune of the
recipe with those values set: its own Olive workflow, config on disk, adapter and loss log. Its
objective, read from the trainers' evaluation on the held-out rows, goes back to the strategy.
Every trial keeps the recipe's seed, so trials differ only in the searched values.

Output folder (built in `.slmops-partial-<name>` next to it, renamed into place when the sweep ends):
    sweep.json     space, sampler, objective, every trial (values, objective, metrics, status), the best
    recipe.yaml    the resolved recipe
    trials.png     every trial's train and eval loss
    trials/NNN/    each trial's fine-tune output (adapter/, olive_config.json, run.json, ...)

`--resume` replays the strategy with the same seed: trials that finished are read back and fed to
the sampler again, not rerun; a trial cut off mid-way continues from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from slmops.core.errors import RunError, SlmopsError
from slmops.core.files import PARTIAL_PREFIX, check_target, resumable_dir, resume_folder, write_text
from slmops.training import runs
from slmops.training.outputs import SWEEP, has_checkpoint
from slmops.training.recipe import Recipe, apply_override, build_recipe, recipe_to_yaml

_SAMPLERS = {"random": "random", "grid": "sequential", "tpe": "tpe"}  # recipe name -> Olive sampler
_HIGHER_IS_BETTER = {"eval_loss": False, "preference_accuracy": True}


@dataclass
class Trial:
    number: int
    params: dict
    status: str = "pending"  # done, failed
    objective: Optional[float] = None
    metrics: dict = field(default_factory=dict)
    folder: str = ""
    seconds: Optional[float] = None
    error: Optional[str] = None
    run_id: Optional[str] = None


@dataclass
class SweepResult:
    output_dir: str
    objective: str
    higher_is_better: bool
    trials: list[Trial]
    best: Optional[Trial]
    reused: int = 0  # trials read back on --resume instead of run


def trial_recipe(recipe: Recipe, params: dict) -> Recipe:
    """The recipe with one trial's values set (validated like --set overrides)."""
    raw = recipe.model_dump(mode="json", exclude={"search"})
    for key, value in params.items():
        apply_override(raw, key.split("."), value)
    trial = build_recipe(raw, f"{recipe.name} (trial values {params})")
    trial.name = recipe.name
    return trial


def objective_of(objective: str, recipe: Recipe, result) -> Optional[float]:
    """The searched metric from a fine-tune's last held-out evaluation; None when it is missing or not finite."""
    stage = result.stages.get(recipe.stages[-1])
    if stage is None:
        return None
    value = stage.eval_metrics.get("rewards/accuracies") if objective == "preference_accuracy" else stage.eval_loss
    return float(value) if value is not None and math.isfinite(value) else None


def check_sweepable(recipe: Recipe) -> dict:
    """Refuse before any training what would fail every trial: no search space, a value the recipe
    rejects, no held-out rows for the objective, a missing tracker. Returns what the sweep ran on
    (data hashes, model fingerprint), which --resume compares."""
    from slmops.core.models import model_fingerprint
    from slmops.training.finetune import plan
    from slmops.training.tracking import check_trackers

    if recipe.search is None:
        raise RunError(
            f"recipe {recipe.name} has no `search` section; add one (search: {{space: {{lora.r: [8, 16]}}}}) "
            "to sweep it"
        )
    for key, values in recipe.search.choices().items():
        for value in values:
            trial_recipe(recipe, {key: value})
    check_trackers(recipe.training.report_to)
    p = plan(recipe)
    stage = recipe.stages[-1]
    if p.counts[stage][1] == 0:
        where = "dpo.data" if stage == "dpo" else "data"
        raise RunError(
            f"the sweep's objective {recipe.objective} is measured on held-out {stage} rows and this recipe "
            f"has none; set {where}.eval_split (e.g. 0.1) or {where}.eval_file"
        )
    return {"data": json.loads(json.dumps(asdict(p.sources))), "model": model_fingerprint(p.model.path)}


def space_size(recipe: Recipe) -> int:
    assert recipe.search is not None  # check_sweepable refuses a recipe without one
    return math.prod(len(values) for values in recipe.search.choices().values())


def sweep(
    recipe: Recipe, output_dir: Path, trials: Optional[int] = None, resume: bool = False, progress=None
) -> SweepResult:
    """Run the sweep (or continue it with resume) and return every trial and the best."""
    identity = check_sweepable(recipe)
    assert recipe.search is not None and recipe.objective is not None  # check_sweepable refuses a recipe without
    assert recipe.name is not None  # load_recipe names every recipe
    n_trials = min(trials or recipe.search.trials, space_size(recipe))
    if progress and n_trials < (trials or recipe.search.trials):
        progress(f"the search space has {n_trials} points: {n_trials} trials")
    objective, higher = recipe.objective, _HIGHER_IS_BETTER[recipe.objective]
    output_dir = Path(output_dir).absolute()
    check_target(output_dir, resume)  # refusals before the run is indexed
    with (
        runs.track(
            "sweep",
            recipe.name,
            output_dir,
            recipe=recipe.name,
            objective=objective,
            sampler=recipe.search.sampler,
            space=recipe.search.choices(),
            trials=n_trials,
        ) as record,
        resumable_dir(output_dir, resume, keep=_worth_resuming) as tmp,
    ):
        before = _previous_trials(tmp, recipe, identity) if resume else {}
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        result = SweepResult(str(output_dir), objective, higher, [], None)
        _write_sweep(tmp, recipe, n_trials, result, identity, before)
        for number, params in _proposals(recipe, n_trials, result):
            trial = before.get(number)
            if trial is not None:
                if trial.params != params:
                    raise RunError(
                        f"--resume: trial {number} now gets {params}, the interrupted sweep ran {trial.params}; "
                        f"resume with the same search space and seed, or delete {tmp} to start over"
                    )
                result.reused += 1
            else:
                trial = _run_trial(recipe, number, params, tmp, record["id"], progress)
            result.trials.append(trial)
            _write_sweep(tmp, recipe, n_trials, result, identity, before)
        result.best = _best(result.trials, higher)
        if result.best is None:
            raise RunError(
                f"no trial of the sweep finished with a {objective} ({len(result.trials)} failed; first: "
                f"{result.trials[0].error if result.trials else 'none ran'}); fix the recipe and run again"
            )
        _write_sweep(tmp, recipe, n_trials, result, identity)
        _plot_trials(tmp, result, runs.runs_dir().absolute() / record["id"] / runs.PLOT, record)
        record.update(
            best={
                "trial": result.best.number,
                "params": result.best.params,
                objective: result.best.objective,
                "adapter": str(output_dir / result.best.folder / "adapter"),
            },
            finished_trials=sum(t.status == "done" for t in result.trials),
        )
    return result


def _proposals(recipe: Recipe, n_trials: int, result: SweepResult) -> Iterator[tuple[int, dict]]:
    """Olive's search strategy over the space; each trial's objective is fed back before the next proposal."""
    from olive.evaluator.metric_result import MetricResult, SubMetricResult
    from olive.search.search_parameter import Categorical
    from olive.search.search_strategy import SearchStrategy

    search, objective = recipe.search, recipe.objective
    assert search is not None and objective is not None  # sweep() ran check_sweepable
    higher = _HIGHER_IS_BETTER[objective]
    config = {"max_samples": n_trials, **({} if search.sampler == "grid" else {"seed": search.seed})}
    strategy = SearchStrategy(
        {"execution_order": "joint", "sampler": _SAMPLERS[search.sampler], "sampler_config": config}
    )
    space = {key: Categorical(values) for key, values in search.choices().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna: "group is an experimental feature"
        strategy.initialize(
            {"finetune": [space]},
            "base",
            {"finetune": {objective: {"higher_is_better": higher, "goal": None, "priority": 1}}},
        )
        for number, sample in enumerate(strategy):
            params = dict(sample.passes_configs["finetune"]["params"])
            yield number, params
            value = result.trials[-1].objective
            if value is None:  # a failed trial: the worst value, so the sampler moves away from it
                value = -1e9 if higher else 1e9
            signal = MetricResult({objective: SubMetricResult(value=value, priority=1, higher_is_better=higher)})
            strategy.record_feedback_signal(sample.search_point.index, signal, ["base"])


def _run_trial(recipe: Recipe, number: int, params: dict, sweep_dir: Path, sweep_id: str, progress) -> Trial:
    from slmops.training.finetune import finetune

    folder = Path("trials") / f"{number:03d}"
    out = sweep_dir / folder
    trial = Trial(number, params, folder=str(folder))
    partial = resume_folder(out)
    resume = partial.exists() and has_checkpoint(partial)
    if partial.exists() and not resume:
        shutil.rmtree(partial)  # cut off before its first checkpoint: start it again
    shutil.rmtree(out, ignore_errors=True)  # finished but not recorded in sweep.json: run it again
    if progress:
        progress(f"trial {number}: {_params_text(params)}" + (" (resuming)" if resume else ""))
    start = time.monotonic()
    r = trial_recipe(recipe, params)  # checked for every value before the sweep started
    assert recipe.name is not None and recipe.objective is not None  # sweep() checked both
    try:
        final = final_folder(sweep_dir) / folder  # where the trial lives once the sweep is complete
        with runs.track(
            "trial", recipe.name, final, **runs.finetune_fields(r), sweep=sweep_id, trial=number, params=params
        ) as record:
            trial.run_id = record["id"]
            result = finetune(r, out, resume=resume)
            runs.add_finetune_result(record, result)
            trial.objective = objective_of(recipe.objective, r, result)
            record["objective"] = {"name": recipe.objective, "value": trial.objective}
            trial.metrics = record["metrics"]
    except SlmopsError as exc:  # this trial's values failed (e.g. out of memory at a large batch): go on
        trial.status, trial.error = "failed", str(exc)
        shutil.rmtree(resume_folder(out), ignore_errors=True)  # its checkpoints are no use to the sweep
    else:
        trial.status = "done" if trial.objective is not None else "failed"
        trial.error = None if trial.objective is not None else f"no finite {recipe.objective} at the end of training"
    trial.seconds = round(time.monotonic() - start, 1)
    if progress:
        shown = f"{trial.objective:.4f}" if trial.objective is not None else trial.error
        progress(f"trial {number}: {recipe.objective} {shown}")
    return trial


def final_folder(sweep_dir: Path) -> Path:
    """The final folder of a sweep that is being built in its partial folder."""
    name = sweep_dir.name
    return sweep_dir.parent / name[len(PARTIAL_PREFIX) :] if name.startswith(PARTIAL_PREFIX) else sweep_dir


def _plot_trials(sweep_dir: Path, result: SweepResult, path: Path, record: dict) -> None:
    """Every trial's loss curves in one PNG (in the runs index and the sweep folder)."""
    logs = {}
    for t in result.trials:
        log_file = sweep_dir / t.folder / "training_log.jsonl"
        if t.status == "done" and log_file.is_file():
            logs[f"{t.number}: {_params_text(t.params)}"] = [json.loads(x) for x in log_file.read_text().splitlines()]
    if logs:
        runs.plot_losses(logs, path, title=f"sweep {record['name']}: {result.objective} per trial")
        shutil.copy2(path, sweep_dir / "trials.png")
        record["outputs"] = {"loss_plot": str(path), "sweep": record["output"]}


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _best(trials: list[Trial], higher: bool) -> Optional[Trial]:
    finished = [t for t in trials if t.status == "done"]
    if not finished:
        return None
    # ties go to the earlier trial
    return (max if higher else min)(finished, key=lambda t: (t.objective, -t.number if higher else t.number))


def _write_sweep(
    folder: Path,
    recipe: Recipe,
    n_trials: int,
    result: SweepResult,
    identity: dict,
    pending: Optional[dict[int, Trial]] = None,
) -> None:
    """sweep.json, whole. `pending`: trials of an interrupted sweep that the replay has not reached yet,
    kept so that a resume cut off again loses none of them."""
    best = result.best
    later = [t for n, t in sorted((pending or {}).items()) if n >= len(result.trials)]
    assert recipe.search is not None  # check_sweepable refuses a recipe without one
    body = {
        "recipe": recipe.name,
        "sampler": recipe.search.sampler,
        "seed": recipe.search.seed,
        "objective": result.objective,
        "higher_is_better": result.higher_is_better,
        "trials_requested": n_trials,
        "space": recipe.search.choices(),
        "identity": identity,
        "trials": [asdict(t) for t in [*result.trials, *later]],
        "best": None
        if best is None
        else {"trial": best.number, "params": best.params, "objective": best.objective, "folder": best.folder},
    }
    write_text(folder / SWEEP, json.dumps(body, indent=2) + "\n")


def _worth_resuming(partial: Path) -> bool:
    """Keep an interrupted sweep that has a finished trial, or a trial with a checkpoint to continue from."""
    return any(partial.glob("trials/*/run.json")) or any(
        partial.glob("trials/.slmops-partial-*/work/*/checkpoint-*/trainer_state.json")
    )


def _previous_trials(partial: Path, recipe: Recipe, identity: dict) -> dict[int, Trial]:
    """The trials the interrupted sweep in `partial` finished or saw fail (same recipe, data and model)."""
    path = partial / SWEEP
    if not path.is_file():
        return {}
    body = json.loads(path.read_text())
    before = (partial / "recipe.yaml").read_text() if (partial / "recipe.yaml").is_file() else None
    if before is not None and _without_trials(before) != _without_trials(recipe_to_yaml(recipe)):
        raise RunError(
            f"--resume: the recipe changed since the interrupted sweep; resume with the same recipe and "
            f"flags (only --trials may change), or delete {partial} to start over"
        )
    changed = [
        label
        for key, label in (("data", "data files"), ("model", "model weights"))
        if body.get("identity", {}).get(key) != identity[key]
    ]
    if changed:
        raise RunError(
            f"--resume: the {' and the '.join(changed)} changed since the interrupted sweep; resume with "
            f"the same ones, or delete {partial} to start over"
        )
    trials = [Trial(**t) for t in body["trials"]]
    # a failed trial is replayed as it failed: rerunning it could feed the sampler another value
    return {
        t.number: t
        for t in trials
        if t.status == "failed" or (t.status == "done" and (partial / t.folder / "run.json").is_file())
    }


def _without_trials(recipe_yaml: str) -> dict:
    import yaml

    raw = yaml.safe_load(recipe_yaml)
    raw.get("search", {}).pop("trials", None)
    return raw
