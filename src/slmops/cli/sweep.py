"""`slmops sweep` (hyper-parameter search through Olive's search strategy) and `slmops runs` (the runs index)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from slmops.cli.finetune import data_flags, report_to_option


@click.command("sweep")
@click.option("-r", "--recipe", required=True, help="Recipe with a `search` section (YAML path or shipped name).")
@click.option(
    "-n", "--trials", type=click.IntRange(1, 10000), default=None, help="Trials to run (default: search.trials)."
)
@click.option("-m", "--model", default=None, help="Model: alias, local HF folder or hub id (overrides model.name).")
@click.option("-d", "--data", default=None, help="Data file or hub dataset id (overrides data.file / data.dataset).")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Sweep folder (default: outputs/<recipe>-sweep-<time>). Must not exist.",
)
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. search.sampler=grid."
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted sweep without redoing its finished trials: the "
    "one for -o, else the recipe's newest under outputs/.",
)
@report_to_option
@click.option("--json", "as_json", is_flag=True, help="Print the trials and the best as JSON.")
def sweep_command(recipe, trials, model, data, output, sets, resume, report_to, as_json) -> None:
    """Search hyper-parameters (search.space) with Olive's samplers: one fine-tune per trial, the best named."""

    from slmops.training.outputs import default_sweep_output, interrupted_sweep
    from slmops.training.recipe import load_recipe, prepare_environment
    from slmops.training.sweep import sweep

    r = load_recipe(
        recipe,
        flags={"model.name": model, "training.report_to": list(report_to) or None, **data_flags(data)},
        sets=list(sets),
    )
    prepare_environment(r)
    if resume and output is None:
        output = interrupted_sweep(r.name)
    output = output or default_sweep_output(r.name)
    result = sweep(r, output, trials=trials, resume=resume, progress=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
    else:
        click.echo(_sweep_table(result))


def _sweep_table(result) -> str:
    arrow = "higher" if result.higher_is_better else "lower"
    lines = [
        f"{len(result.trials)} trials, objective {result.objective} ({arrow} is better)"
        + (f", {result.reused} read back from the interrupted sweep" if result.reused else ""),
        f"  {'trial':>5}  {result.objective:>19}  {'seconds':>7}  values",
    ]
    for t in result.trials:
        value = f"{t.objective:.4f}" if t.objective is not None else "failed"
        mark = " <- best" if result.best and t.number == result.best.number else ""
        lines.append(
            f"  {t.number:>5}  {value:>19}  {t.seconds if t.seconds is not None else '-':>7}  "
            f"{', '.join(f'{k}={v}' for k, v in t.params.items())}{mark}"
        )
    best = Path(result.output_dir) / result.best.folder
    lines += [
        f"best: trial {result.best.number}, adapter {best / 'adapter'}",
        f"export it: slmops export -a best={result.output_dir} -o bundle",
    ]
    return "\n".join(lines)


@click.group("runs")
def runs_group() -> None:
    """The local runs index (./runs, or $SLMOPS_RUNS_DIR): fine-tunes, sweeps and their trials."""


@runs_group.command("list")
@click.option("--kind", type=click.Choice(["finetune", "sweep", "trial"]), default=None, help="Only runs of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def runs_list(kind, as_json) -> None:
    """Every run, oldest first: id, status, recipe, objective or eval loss, time."""
    from slmops.training.runs import list_runs, runs_dir

    records = [r for r in list_runs() if kind is None or r["kind"] == kind]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo(f"no runs in {runs_dir()}")
        return
    click.echo(f"{'id':<48} {'status':<11} {'metric':>20} {'seconds':>8}")
    for r in records:
        click.echo(f"{r['id']:<48} {r['status']:<11} {_metric(r):>20} {r.get('seconds') or '-':>8}")


def _metric(record: dict) -> str:
    if isinstance(record.get("objective"), dict) and record["objective"].get("value") is not None:
        return f"{record['objective']['name']} {record['objective']['value']:.4f}"
    if record.get("best"):
        name = next(k for k in record["best"] if k not in ("trial", "params", "adapter"))
        return f"best {name} {record['best'][name]:.4f}"
    losses = [m["eval_loss"] for m in (record.get("metrics") or {}).values() if m.get("eval_loss") is not None]
    return f"eval_loss {losses[-1]:.4f}" if losses else "-"


@runs_group.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def runs_show(run_id, as_json) -> None:
    """One run's record: recipe, data hashes, metrics, durations, outputs (the loss plot among them)."""
    from slmops.training.runs import find_run

    record = find_run(run_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        else:
            click.echo(f"{key}: {json.dumps(value) if isinstance(value, list) else value}")
