"""`slmops finetune`: a recipe becomes an Olive workflow, and Olive trains the adapter."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from slmops.core.choices import TRACKERS


def report_to_option(f):
    return click.option(
        "--report-to",
        "report_to",
        multiple=True,
        type=click.Choice(TRACKERS),
        help="Log training to an experiment tracker (repeatable; overrides training.report_to). Off by default.",
    )(f)


def model_and_data_options(f):
    """-m / -d: the recipe's model and data, overridden from the command line (finetune, sweep)."""
    f = click.option(
        "-d", "--data", default=None, help="Data file or hub dataset id (overrides data.file / data.dataset)."
    )(f)
    return click.option(
        "-m", "--model", default=None, help="Model: alias, local HF folder or hub id (overrides model.name)."
    )(f)


@click.command("finetune")
@click.option("-r", "--recipe", required=True, help="Recipe YAML path or shipped recipe name.")
@model_and_data_options
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: outputs/<recipe>-<time>). Must not exist.",
)
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. training.max_steps=20."
)
@click.option("--dry-run", is_flag=True, help="Write the Olive config and the resolved recipe, then stop.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from its last checkpoint (training.save_steps sets how often): "
    "the run for -o, else the recipe's newest under outputs/.",
)
@click.option(
    "--num-processes",
    type=click.IntRange(1, 65536),
    default=None,
    help="Train in N data-parallel processes in all, over every machine (overrides distributed.num_processes).",
)
@click.option(
    "--num-machines",
    type=click.IntRange(1, 4096),
    default=None,
    help="Machines taking part (distributed.num_machines).",
)
@click.option(
    "--machine-rank",
    type=click.IntRange(0, 4095),
    default=None,
    help="This machine's rank; 0 writes the output (distributed.machine_rank).",
)
@click.option(
    "--main-address",
    metavar="HOST:PORT",
    default=None,
    help="Machine 0's address, the same on every machine (distributed.main_address).",
)
@report_to_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune_command(
    recipe,
    model,
    data,
    output,
    sets,
    dry_run,
    resume,
    num_processes,
    num_machines,
    machine_rank,
    main_address,
    report_to,
    as_json,
) -> None:
    """Fine-tune a model (LoRA / QLoRA SFT, DPO) through Olive; writes a PEFT adapter."""
    from slmops.training.recipe import data_overrides, load_recipe, prepare_environment

    r = load_recipe(
        recipe,
        flags={
            "model.name": model,
            "distributed.num_processes": num_processes,
            "distributed.num_machines": num_machines,
            "distributed.machine_rank": machine_rank,
            "distributed.main_address": main_address,
            "training.report_to": list(report_to) or None,
            **data_overrides(data),
        },
        sets=list(sets),
    )
    assert r.name is not None  # load_recipe names every recipe
    prepare_environment(r)
    from slmops.core.errors import RunError
    from slmops.training.finetune import finetune
    from slmops.training.outputs import default_output, interrupted_run

    if resume and dry_run:
        raise RunError("--resume continues training and --dry-run trains nothing; drop one of them")
    machines, rank = _machine(r)
    if machines > 1 and output is None:  # a default name carries this machine's clock
        raise RunError(f"{machines} machines need -o/--output, the same folder name on every machine")
    if resume and output is None:
        output = interrupted_run(r.name)
    output = output or default_output(r.name)
    if dry_run:
        result = finetune(r, output, dry_run=True)
    elif rank:  # machine 0 writes the output, the runs index and the summary
        from slmops.training.finetune import node_folder

        if resume:
            _say_resume_point(node_folder(output, rank))
        result = finetune(r, output, resume=resume)
        click.echo(
            f"Machine {rank} of {result.machine[1] if result.machine else '?'} trained its share; machine 0 "
            f"writes the adapter, the summary and the runs index, to {Path(output).absolute()} there"
        )
        return
    else:
        from slmops.core.files import check_target
        from slmops.training import runs

        check_target(output, resume)  # an output that exists is refused before the run is indexed
        if resume:
            _say_resume_point(output)
        with runs.track("finetune", r.name, output, **runs.finetune_fields(r)) as record:
            result = finetune(r, output, resume=resume)
            runs.add_finetune_result(record, result)
    if as_json:
        click.echo(json.dumps({k: v for k, v in asdict(result).items() if k != "log"}, indent=2))
    else:
        click.echo(_summary(r, result))


def _machine(recipe) -> tuple[int, int]:
    """(machines, this machine's rank): the accelerate config file's, unless a flag or recipe key sets them."""
    if not recipe.distributed.multi_process:
        return 1, 0
    from slmops.training.distributed import topology

    topo = topology(recipe.distributed)
    return topo.machines, topo.rank


def _say_resume_point(output: Path) -> None:
    from slmops.core.files import resume_folder
    from slmops.training.outputs import last_checkpoint

    point = last_checkpoint(resume_folder(output))
    where = (
        f"{point[0].parent.name}/{point[0].name} (step {point[1]})" if point else "the start (no checkpoint was saved)"
    )
    click.echo(f"Resuming {output} from {where}", err=True)


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _summary(recipe, result) -> str:
    out = Path(result.output_dir)
    verb = "Planned" if result.dry_run else "Fine-tuned"
    lines = [
        f"{verb} {recipe.model.name} with {recipe.method} (r={recipe.lora.r}, "
        f"{', '.join(recipe.lora.target_modules)}), stages {' -> '.join(recipe.stages)} - recipe {recipe.name}"
    ]
    for stage in recipe.stages:
        n_train, n_eval = result.counts[stage]
        lines.append(f"  {stage:<13} {n_train} train, {n_eval} eval examples")
        if stage in result.stages:
            lines += _stage_lines(result.stages[stage])
    if not result.dry_run:
        lines += [f"  time          {result.seconds:.1f} s", f"  adapter       {out / 'adapter'}"]
    lines += [f"  olive config  {out / 'olive_config.json'}", f"  recipe        {out / 'recipe.yaml'}"]
    return "\n".join(lines)


def _stage_lines(stage) -> list[str]:
    lines = [f"    steps       {stage.steps}"]
    if stage.final_loss is not None:
        lines.append(
            f"    train loss  {stage.first_loss:.4f} -> {stage.final_loss:.4f} "
            f"(mean of first/last {stage.loss_window} steps)"
        )
    if stage.eval_loss is not None:
        start = f"{stage.eval_loss_start:.4f} -> " if stage.eval_loss_start is not None else ""
        lines.append(f"    eval loss   {start}{stage.eval_loss:.4f}")
    for label, metrics in (("train", stage.train_metrics), ("eval", stage.eval_metrics)):
        shown = [f"{key.split('/')[1]} {metrics[key]:+.4f}" for key in REWARDS if key in metrics]
        if shown:
            lines.append(f"    {label + ' rewards':<14}{', '.join(shown)}")
    return lines
