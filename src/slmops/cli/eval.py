"""`slmops eval`: preference accuracy and DPO implicit rewards on held-out pairs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click


@click.command("eval")
@click.option(
    "-r", "--recipe", default=None, help="Take model, pairs (held-out part), beta and max length from a recipe."
)
@click.option("-m", "--model", default=None, help="Base model: alias, local HF folder or hub id.")
@click.option("-a", "--adapter", type=click.Path(path_type=Path), default=None, help="PEFT adapter to evaluate.")
@click.option(
    "--reference",
    default="base",
    show_default=True,
    help="Reference for implicit rewards: 'base' (adapter disabled) or another adapter folder.",
)
@click.option("-d", "--data", default=None, help="Preference file (every pair is used); overrides the recipe's pairs.")
@click.option(
    "--split",
    type=click.Choice(["eval", "train", "all"]),
    default="eval",
    show_default=True,
    help="Which of the recipe's pairs to use.",
)
@click.option("--beta", type=float, default=None, help="DPO beta for implicit rewards (default: recipe's, else 0.1).")
@click.option("--max-length", type=int, default=None, help="Tokens per prompt + answer (default: recipe's, else 512).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N pairs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16 = CPU autocast: faster where the CPU has bf16, log-probs less exact.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_command(recipe, model, adapter, reference, data, split, beta, max_length, limit, batch_size, dtype, as_json):
    """Evaluate a model (and adapter) on held-out preference pairs."""
    from slmops.core.privacy import go_offline

    if not recipe and not data:
        raise click.UsageError("pass --recipe R (its held-out pairs) or --data PREFS")
    go_offline()
    from slmops.core.models import DEFAULT_MODEL, resolve_model
    from slmops.measuring import evaluate
    from slmops.training.recipe import load_recipe

    r = load_recipe(recipe) if recipe else None
    pairs = evaluate.file_pairs(data) if data else evaluate.recipe_pairs(r, split)
    pairs = pairs[:limit] if limit else pairs
    dpo = r.dpo if r else None
    report = evaluate.evaluate_preferences(
        resolve_model(model or (r.model.name if r else DEFAULT_MODEL)).path,
        pairs,
        adapter=adapter,
        reference_adapter=None if reference == "base" else Path(reference),
        beta=beta or (dpo.beta if dpo else 0.1),
        max_length=max_length or (dpo.max_length if dpo else 512),
        batch_size=batch_size,
        dtype=dtype,
    )
    click.echo(json.dumps(asdict(report), indent=2) if as_json else _table(report))


def _table(report) -> str:
    lines = [
        f"{report.pairs} preference pairs, model {report.model}"
        + (f" + adapter {report.adapter}" if report.adapter else "")
    ]
    if report.reference_preference_accuracy is not None:
        lines.append(
            f"  preference accuracy (sum)        {report.preference_accuracy:.3f}   "
            f"(reference: {report.reference_preference_accuracy:.3f})"
        )
        lines.append(
            f"  preference accuracy (per token)  {report.preference_accuracy_normalised:.3f}   "
            f"(reference: {report.reference_preference_accuracy_normalised:.3f})"
        )
        lines.append(
            f"  implicit reward accuracy         {report.reward_accuracy:.3f}   "
            f"vs {report.reference}, beta {report.beta}"
        )
        lines.append(f"  implicit reward margin           {report.reward_margin:+.4f}")
        lines.append(f"  eval loss (DPO sigmoid)          {report.eval_loss:.4f}")
    else:
        lines.append(f"  preference accuracy (sum)        {report.preference_accuracy:.3f}")
        lines.append(f"  preference accuracy (per token)  {report.preference_accuracy_normalised:.3f}")
    return "\n".join(lines)
