"""`slmops sweep`: hyper-parameter search through Olive's search strategy."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from slmops.cli.finetune import model_and_data_options, report_to_option


@click.command("sweep")
@click.option("-r", "--recipe", required=True, help="Recipe with a `search` section (YAML path or shipped name).")
@click.option(
    "-n", "--trials", type=click.IntRange(1, 10000), default=None, help="Trials to run (default: search.trials)."
)
@model_and_data_options
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
    from slmops.training.recipe import data_overrides, load_recipe, prepare_environment
    from slmops.training.sweep import sweep

    r = load_recipe(
        recipe,
        flags={"model.name": model, "training.report_to": list(report_to) or None, **data_overrides(data)},
        sets=list(sets),
    )
    assert r.name is not None  # load_recipe names every recipe
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
