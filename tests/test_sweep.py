"""Sweeps through Olive's search strategy, the runs index and experiment trackers, on a tiny random model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PREFERENCE_DATA, SFT_DATA, write_recipe
from slmops.cli import cli
from slmops.core.errors import RecipeError, RunError
from slmops.training.recipe import build_recipe, load_recipe

SEARCH = """search:
  sampler: {sampler}
  trials: 3
  space:
    training.learning_rate: [1.0e-4, 1.0e-2, 5.0e-2]
"""


def sweep_recipe(tmp_path: Path, model: Path, sampler: str = "tpe", extra: str = "") -> Path:
    body = f"""model:
  name: {model}
data:
  file: {SFT_DATA}
  max_samples: 24
  max_seq_len: 64
  eval_split: 0.25
lora:
  r: 4
  alpha: 8
training:
  max_steps: 3
  batch_size: 2
  dtype: float32
{SEARCH.format(sampler=sampler)}{extra}"""
    return write_recipe(tmp_path / "sweep.yaml", body)


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, (result.stdout if result.exit_code == 0 else result.output).strip()


def _runs():
    code, out = run("runs", "list", "--json")
    assert code == 0, out
    return json.loads(out)


def _trial_eval_loss(sweep_dir: Path, folder: str) -> float:
    log = [json.loads(line) for line in (sweep_dir / folder / "training_log.jsonl").read_text().splitlines()]
    return round([e["eval_loss"] for e in log if "eval_loss" in e][-1], 4)


# --- the search block ---------------------------------------------------------------------------


def test_search_space_choices_and_objective():
    recipe = build_recipe(
        {
            "data": {"file": "x.jsonl"},
            "search": {
                "space": {
                    "training.learning_rate": {"min": 1e-5, "max": 1e-3, "steps": 3, "log": True},
                    "lora.r": {"min": 4, "max": 16, "steps": 3},
                    "lora.alpha": [8, 16],
                }
            },
        },
        "t",
    )
    assert recipe.search.choices() == {
        "training.learning_rate": [1e-5, 1e-4, 1e-3],
        "lora.r": [4, 10, 16],
        "lora.alpha": [8, 16],
    }
    assert recipe.objective == "eval_loss" and recipe.search.sampler == "tpe"
    dpo = {"dpo": {"data": {"file": "p.jsonl"}}}
    assert build_recipe({**dpo, "search": {"space": {"dpo.beta": [0.1, 0.5]}}}, "t").objective == "preference_accuracy"


@pytest.mark.parametrize(
    "search, message",
    [
        (
            {"space": {"lora.rank": [4]}},
            "search.space: Value error, lora.rank cannot be searched; searchable keys: training.learning_rate",
        ),
        ({"space": {"dpo.beta": [0.1]}}, "search.space: dpo.beta needs a `dpo` section"),
        ({"space": {"lora.r": [4]}, "objective": "preference_accuracy"}, "preference_accuracy needs a `dpo` section"),
        ({"space": {"training.lr_scheduler": {"min": 1, "max": 2}}}, "a range needs a numeric key"),
        ({"space": {"lora.r": [4]}, "sampler": "bayes"}, "search.sampler: Input should be 'random', 'grid' or 'tpe'"),
        ({"space": {"lora.r": [4]}, "extra": 1}, "search.extra: unknown key"),
    ],
)
def test_bad_search_section(search, message):
    with pytest.raises(RecipeError, match=None) as info:
        build_recipe({"data": {"file": "x.jsonl"}, "search": search}, "t")
    assert message in str(info.value)


def test_trial_values_are_validated_like_overrides(tmp_path, tiny_model):
    from slmops.training.sweep import trial_recipe

    recipe = load_recipe(str(sweep_recipe(tmp_path, tiny_model)))
    trial = trial_recipe(recipe, {"training.learning_rate": 0.05, "lora.r": 8})
    assert (trial.training.learning_rate, trial.lora.r, trial.search, trial.name) == (0.05, 8, None, "sweep")
    with pytest.raises(RecipeError, match="lora.r: Input should be greater than or equal to 1"):
        trial_recipe(recipe, {"lora.r": 0})


# --- sweeps ---------------------------------------------------------------------------------------


def test_three_trial_sweep_picks_the_best_trial(tmp_path, tiny_model, runs_index):
    out = tmp_path / "sweep"
    code, msg = run("sweep", "-r", sweep_recipe(tmp_path, tiny_model, "tpe"), "-o", out, "--trials", "5")
    assert code == 0, msg
    body = json.loads((out / "sweep.json").read_text())
    assert body["trials_requested"] == 3  # the space has 3 points
    trials = body["trials"]
    assert [t["status"] for t in trials] == ["done"] * 3
    assert sorted(t["params"]["training.learning_rate"] for t in trials) == [1e-4, 1e-2, 5e-2]  # 3 distinct points
    for t in trials:  # each trial's objective is its own held-out loss, and its fine-tune output is kept
        assert t["objective"] == _trial_eval_loss(out, t["folder"])
        assert (out / t["folder"] / "adapter" / "adapter_model.safetensors").is_file()
        assert (
            json.loads((out / t["folder"] / "olive_config.json").read_text())["passes"]["sft"]["training_args"][
                "learning_rate"
            ]
            == t["params"]["training.learning_rate"]
        )
    best = min(trials, key=lambda t: t["objective"])
    assert body["best"] == {
        "trial": best["number"],
        "params": best["params"],
        "objective": best["objective"],
        "folder": best["folder"],
    }
    assert f"best: trial {best['number']}, adapter {out / best['folder'] / 'adapter'}" in msg
    # the sweep folder exports as its best trial's adapter
    from slmops.shipping.adapters import load_adapter

    assert load_adapter("best", out).path == (out / best["folder"] / "adapter").resolve()
    # the runs index: the sweep and its three trials, with metrics, durations, outputs and loss plots
    records = _runs()
    assert sorted(r["kind"] for r in records) == ["sweep", "trial", "trial", "trial"]
    sweep_record = next(r for r in records if r["kind"] == "sweep")
    assert sweep_record["status"] == "done" and sweep_record["best"]["trial"] == best["number"]
    for r in (r for r in records if r["kind"] == "trial"):
        assert r["status"] == "done" and r["sweep"] == sweep_record["id"] and r["seconds"] > 0
        assert r["objective"]["value"] == r["metrics"]["sft"]["eval_loss"]
        assert r["data"]["sft"]["sha256"] and Path(r["outputs"]["adapter"]).is_dir()
        assert Path(r["outputs"]["loss_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, shown = run("runs", "show", sweep_record["id"][-4:])
    assert code == 0 and f"id: {sweep_record['id']}" in shown and "status: done" in shown


CRASH_ON_SECOND_TRIAL = """
import os, signal, sys
import slmops.training.finetune as f
real, calls = f.finetune, []
def crash(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, like a power cut
    return real(*args, **kwargs)
f.finetune = crash
from slmops.cli import cli
cli(sys.argv[1:], prog_name="slmops")
"""


@pytest.mark.slow  # a sweep killed in a subprocess, resumed, and a whole one
def test_sweep_killed_mid_way_resumes_without_redoing_trials(tmp_path, tiny_model, runs_index):
    recipe = sweep_recipe(tmp_path, tiny_model, "tpe")
    out = tmp_path / "sweep"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_ON_SECOND_TRIAL, "sweep", "-r", str(recipe), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert not out.exists()
    # the index survived: the finished trial is done, the killed trial and the sweep show as crashed
    statuses = sorted((r["kind"], r.get("trial"), r["status"]) for r in _runs())
    assert statuses == [("sweep", None, "crashed"), ("trial", 0, "done"), ("trial", 1, "crashed")]
    partial = tmp_path / ".slmops-partial-sweep"
    first = partial / "trials" / "000" / "adapter" / "adapter_model.safetensors"
    before = first.stat().st_mtime_ns

    code, msg = run("sweep", "-r", recipe, "-o", out, "--resume")
    assert code == 0, msg
    assert "3 trials, objective eval_loss (lower is better), 1 read back from the interrupted sweep" in msg
    assert (out / "trials" / "000" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before
    body = json.loads((out / "sweep.json").read_text())
    assert [t["objective"] for t in body["trials"]] == [_trial_eval_loss(out, t["folder"]) for t in body["trials"]]
    kinds = [(r["kind"], r.get("trial"), r["status"]) for r in _runs()]
    assert kinds.count(("trial", 0, "done")) == 1  # trial 0 ran once
    assert ("sweep", None, "done") in kinds and ("trial", 2, "done") in kinds
    # TPE replayed with trial 0's objective proposes what an uninterrupted sweep proposes
    assert run("sweep", "-r", recipe, "-o", tmp_path / "whole")[0] == 0
    whole = json.loads((tmp_path / "whole" / "sweep.json").read_text())
    assert [(t["params"], t["objective"]) for t in body["trials"]] == [
        (t["params"], t["objective"]) for t in whole["trials"]
    ]
    assert body["best"] == whole["best"]


def test_sweep_refusals(tmp_path, tiny_model):
    plain = write_recipe(tmp_path / "plain.yaml", f"model:\n  name: {tiny_model}\ndata:\n  file: {SFT_DATA}\n")
    assert run("sweep", "-r", plain, "-o", tmp_path / "a") == (
        2,
        "Error: recipe plain has no `search` section; add one (search: {space: {lora.r: [8, 16]}}) to sweep it",
    )
    no_eval = write_recipe(tmp_path / "no-eval.yaml", plain.read_text() + SEARCH.format(sampler="grid"))
    assert run("sweep", "-r", no_eval, "-o", tmp_path / "a") == (
        2,
        "Error: the sweep's objective eval_loss is measured on held-out sft rows and this recipe has none; set "
        "data.eval_split (e.g. 0.1) or data.eval_file",
    )
    assert not (tmp_path / "a").exists()
    assert run("sweep", "-r", sweep_recipe(tmp_path, tiny_model), "-o", tmp_path / "b", "--resume")[1].startswith(
        "Error: nothing to resume for"
    )
    bad = sweep_recipe(tmp_path, tiny_model, extra="    lora.r: [4, 0]\n")
    code, msg = run("sweep", "-r", bad, "-o", tmp_path / "c")
    assert code == 2 and "(trial values {'lora.r': 0}): lora.r: Input should be greater than or equal to 1" in msg
    assert not (tmp_path / "c").exists() and _runs() == []  # refused before anything ran or was indexed


def test_resume_without_output_finds_the_newest_interrupted_sweep(tmp_path, monkeypatch):
    from slmops.training.outputs import interrupted_run, interrupted_sweep

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match="nothing to resume: no interrupted sweep of recipe r under outputs/"):
        interrupted_sweep("r")
    for name, files in (
        (".slmops-partial-r-sweep-20260101-000000", ["recipe.yaml", "sweep.json"]),
        (".slmops-partial-r-sweep-20260102-000000", ["recipe.yaml", "sweep.json"]),
        (".slmops-partial-r-20260103-000000", ["recipe.yaml"]),
    ):  # a fine-tune of the recipe
        (tmp_path / "outputs" / name).mkdir(parents=True)
        for f in files:
            (tmp_path / "outputs" / name / f).write_text("{}")
    assert interrupted_sweep("r") == Path("outputs/r-sweep-20260102-000000")
    assert interrupted_run("r") == Path("outputs/r-20260103-000000")  # finetune --resume skips sweeps


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model, monkeypatch):
    import slmops.training.finetune as finetune_module
    from slmops.training.sweep import sweep

    real = finetune_module.finetune

    def flaky(recipe, out, **kwargs):
        if recipe.training.learning_rate == 1e-2:
            raise RunError("Olive finished without producing an adapter")
        return real(recipe, out, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", flaky)
    result = sweep(load_recipe(str(sweep_recipe(tmp_path, tiny_model, "grid"))), tmp_path / "s")
    assert [(t.status, t.error) for t in result.trials] == [
        ("done", None),
        ("failed", "Olive finished without producing an adapter"),
        ("done", None),
    ]
    assert result.best.number in (0, 2)
    assert not list((tmp_path / "s" / "trials").glob(".slmops-*"))  # no leftovers of the failed trial


def test_resume_refuses_a_changed_recipe_or_data(tmp_path, tiny_model):
    from slmops.training.recipe import recipe_to_yaml
    from slmops.training.sweep import SweepResult, Trial, _previous_trials, _write_sweep, check_sweepable

    recipe = load_recipe(str(sweep_recipe(tmp_path, tiny_model)))
    identity = check_sweepable(recipe)
    partial = tmp_path / "partial"
    (partial / "trials" / "000").mkdir(parents=True)
    (partial / "trials" / "000" / "run.json").write_text("{}")
    (partial / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    done = Trial(0, {"training.learning_rate": 1e-4}, "done", 5.0, folder="trials/000")
    failed = Trial(1, {"training.learning_rate": 1e-2}, "failed", error="boom", folder="trials/001")
    result = SweepResult(str(partial), "eval_loss", False, [done, failed], None)
    _write_sweep(partial, recipe, 3, result, identity)
    assert _previous_trials(partial, recipe, identity) == {0: done, 1: failed}  # failed ones replay as failed
    # a resume cut off before its replay reached them keeps them
    _write_sweep(
        partial,
        recipe,
        3,
        SweepResult(str(partial), "eval_loss", False, [], None),
        identity,
        pending={0: done, 1: failed},
    )
    assert _previous_trials(partial, recipe, identity) == {0: done, 1: failed}
    recipe.search.trials = 5  # more trials is fine
    assert _previous_trials(partial, recipe, identity) == {0: done, 1: failed}
    with pytest.raises(RunError, match="--resume: the data files changed since the interrupted sweep"):
        _previous_trials(partial, recipe, dict(identity, data={"sft": {"sha256": "other"}}))
    recipe.lora.r = 8
    with pytest.raises(RunError, match="--resume: the recipe changed since the interrupted sweep"):
        _previous_trials(partial, recipe, identity)


def test_dpo_sweep_optimises_preference_accuracy(tmp_path, tiny_model):
    body = f"""model:
  name: {tiny_model}
dpo:
  data:
    file: {PREFERENCE_DATA}
    max_samples: 12
    eval_split: 0.1
  max_length: 64
  max_steps: 2
  batch_size: 2
  learning_rate: 5.0e-2
  dtype: float32
lora:
  r: 4
  alpha: 8
search:
  sampler: random
  trials: 2
  space:
    dpo.beta: [0.05, 0.5]
"""
    out = tmp_path / "sweep"
    code, msg = run("sweep", "-r", write_recipe(tmp_path / "dpo.yaml", body), "-o", out, "--json")
    assert code == 0, msg
    result = json.loads(msg)
    assert result["objective"] == "preference_accuracy" and result["higher_is_better"] is True
    for t in result["trials"]:
        log = [json.loads(line) for line in (out / t["folder"] / "training_log.jsonl").read_text().splitlines()]
        assert t["objective"] == round([e["eval_rewards/accuracies"] for e in log if "eval_loss" in e][-1], 4)
    assert sorted(t["params"]["dpo.beta"] for t in result["trials"]) == [0.05, 0.5]
    assert result["best"]["objective"] == max(t["objective"] for t in result["trials"])


# --- runs index and trackers -----------------------------------------------------------------------


def test_finetune_is_indexed_and_a_torn_record_is_skipped(tmp_path, tiny_model, runs_index):
    recipe = sweep_recipe(tmp_path, tiny_model)
    assert run("finetune", "-r", recipe, "-o", tmp_path / "ft")[0] == 0
    assert run("finetune", "-r", recipe, "-o", tmp_path / "ft2", "--dry-run")[0] == 0  # plans are not runs
    (runs_index / "torn").mkdir()
    (runs_index / "torn" / "record.json").write_text('{"id": "torn", "sta')
    (record,) = _runs()
    assert (record["kind"], record["status"], record["recipe"]) == ("finetune", "done", "sweep")
    assert record["metrics"]["sft"]["steps"] == 3 and record["outputs"]["adapter"] == str(tmp_path / "ft" / "adapter")
    assert record["data"]["sft"]["path"] == str(SFT_DATA)
    code, out = run("runs", "list")
    assert code == 0 and record["id"] in out and "done" in out
    assert run("runs", "show", "nope") == (2, f"Error: no run 'nope' in {runs_index}; `slmops runs list` shows the ids")


def test_report_to_tensorboard_is_opt_in(tmp_path, tiny_model, monkeypatch):
    recipe = sweep_recipe(tmp_path, tiny_model)
    assert run("finetune", "-r", recipe, "-o", tmp_path / "plain")[0] == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
    config = json.loads((tmp_path / "plain" / "olive_config.json").read_text())
    assert config["passes"]["sft"]["training_args"]["report_to"] == "none"

    assert run("finetune", "-r", recipe, "-o", tmp_path / "tb", "--report-to", "tensorboard")[0] == 0
    events = list((tmp_path / "tb" / "tensorboard" / "sft").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert run("finetune", "-r", recipe, "-o", tmp_path / "ml", "--report-to", "mlflow") == (
        2,
        "Error: reporting to mlflow needs the mlflow package, which is not installed; `pip install mlflow`, or "
        "drop mlflow from --report-to / training.report_to",
    )
