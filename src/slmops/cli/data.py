"""`slmops data preview`: what a recipe trains on, token by token."""

from __future__ import annotations

import json
import sys

import click

from slmops.cli.finetune import model_and_data_options


@click.group("data")
def data_group() -> None:
    """Look at training data as the fine-tune sees it."""


@data_group.command("preview")
@click.option("-r", "--recipe", required=True, help="Recipe YAML path or shipped recipe name.")
@model_and_data_options
@click.option("--rows", type=click.IntRange(0), default=3, show_default=True, help="Rows to show token by token.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any recipe key, e.g. data.train_on=last_assistant.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Statistics and rows as JSON: each token's id, text and trained flag."
)
def preview_command(recipe, model, data, rows, sets, as_json) -> None:
    """Show rows after the chat template and the mask (trained tokens marked) and the data's statistics."""
    from slmops.training.preview import preview
    from slmops.training.recipe import data_overrides, load_recipe, prepare_environment

    r = load_recipe(recipe, flags={"model.name": model, **data_overrides(data)}, sets=list(sets))
    prepare_environment(r)
    result = preview(r, rows)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        return
    colour = sys.stdout.isatty()
    for row in result.rows:
        click.echo(click.style(f"--- {row.kind} row {row.number}", bold=True))
        click.echo(_render(row.tokens, colour))
    for s in result.stats:
        click.echo(
            f"{s.stage}: {s.rows} rows, {s.tokens} tokens, {s.trained_share:.1%} trained, "
            f"{s.padding_share:.1%} padding in batches, {s.truncated_rows} truncated"
        )
        for note in s.notes:
            click.echo(f"  {note}")
    if not colour and result.rows:
        click.echo("(trained tokens are between [[ and ]])")


def _render(tokens, colour: bool) -> str:
    """Trained tokens green on a terminal, else between [[ and ]]; the rest dim."""
    parts, trained = [], False
    for token in tokens:
        if colour:
            parts.append(click.style(token.text, fg="green") if token.trained else click.style(token.text, dim=True))
        else:
            parts.append(
                ("[[" if token.trained and not trained else "]]" if trained and not token.trained else "") + token.text
            )
        trained = token.trained
    if trained and not colour:
        parts.append("]]")
    return "".join(parts)
