"""`slmops finetune`: a recipe becomes an Olive workflow, and Olive trains the adapter."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import click


@click.command("finetune")
@click.option("-r", "--recipe", required=True, help="Recipe YAML path or shipped recipe name.")
@click.option("-m", "--model", default=None, help="Model: alias, local HF folder or hub id (overrides model.name).")
@click.option("-d", "--data", default=None, help="Data file or hub dataset id (overrides data.file / data.dataset).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: outputs/<recipe>-<time>). Must not exist.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. training.max_steps=20.")
@click.option("--dry-run", is_flag=True, help="Write the Olive config and the resolved recipe, then stop.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune_command(recipe, model, data, output, sets, dry_run, as_json) -> None:
    """Fine-tune a model (LoRA / QLoRA SFT) through Olive; writes a PEFT adapter."""
    from slmops.recipe import load_recipe
    from slmops.privacy import prepare_environment

    r = load_recipe(recipe, flags={"model.name": model, **_data_flags(data)}, sets=list(sets))
    prepare_environment(r)
    from slmops.finetune import finetune

    output = output or Path("outputs") / f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = finetune(r, output, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({k: v for k, v in asdict(result).items() if k != "log"}, indent=2))
    else:
        click.echo(_summary(r, result))


def _data_flags(data: str | None) -> dict:
    if data is None:
        return {}
    from slmops.models import needs_hub
    from slmops.recipe import UNSET

    if needs_hub(data):
        return {"data.dataset": data, "data.file": UNSET}
    return {"data.file": data, "data.dataset": UNSET}


def _summary(recipe, result) -> str:
    out = Path(result.output_dir)
    lines = [f"{'Planned' if result.dry_run else 'Fine-tuned'} {recipe.model.name} with {recipe.method} "
             f"(r={recipe.lora.r}, {', '.join(recipe.lora.target_modules)}) - recipe {recipe.name}",
             f"  examples      {result.n_train} train, {result.n_eval} eval"]
    if not result.dry_run:
        loss = "n/a"
        if result.final_loss is not None:
            loss = f"{result.first_loss:.4f} -> {result.final_loss:.4f} (mean of first/last {result.loss_window} steps)"
        lines += [f"  steps         {result.steps}", f"  train loss    {loss}"]
        if result.eval_loss is not None:
            start = f"{result.eval_loss_start:.4f} -> " if result.eval_loss_start is not None else ""
            lines.append(f"  eval loss     {start}{result.eval_loss:.4f}")
        lines += [f"  time          {result.seconds:.1f} s", f"  adapter       {out / 'adapter'}"]
    lines += [f"  olive config  {out / 'olive_config.json'}", f"  recipe        {out / 'recipe.yaml'}"]
    return "\n".join(lines)
