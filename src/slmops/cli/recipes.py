"""`slmops recipes list|show|validate`."""

from __future__ import annotations

from typing import cast

import click


@click.group("recipes")
def recipes_group() -> None:
    """List, show and validate recipes."""


@recipes_group.command("list")
def list_command() -> None:
    """The shipped recipes: name, method, model and data."""
    from slmops.training.recipe import load_recipe, shipped_recipes

    for path in shipped_recipes():
        r = load_recipe(str(path))
        sections = [r.data, r.dpo.data if r.dpo else None]
        # cast: a data section's validator requires `file` or `dataset`
        data = " + ".join(cast(str, s.file or s.dataset) for s in sections if s is not None)
        click.echo(f"{path.stem:32} {'+'.join(r.stages):8} {r.method:6} {r.model.name:24} {data}")


@recipes_group.command("show")
@click.argument("recipe")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any key, e.g. lora.r=8.")
def show_command(recipe: str, sets: tuple[str, ...]) -> None:
    """Print a recipe with every default filled in."""
    from slmops.training.recipe import load_recipe, recipe_to_yaml

    click.echo(recipe_to_yaml(load_recipe(recipe, sets=list(sets))), nl=False)


@recipes_group.command("validate")
@click.argument("recipes", nargs=-1)
def validate_command(recipes: tuple[str, ...]) -> None:
    """Validate recipes (default: every shipped recipe). Exit 2 on the first invalid one."""
    from slmops.training.recipe import find_recipe, load_recipe, shipped_recipes

    for name in recipes or [str(p) for p in shipped_recipes()]:
        load_recipe(name)
        click.echo(f"ok  {find_recipe(name)}")
