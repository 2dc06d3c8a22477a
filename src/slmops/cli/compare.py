"""`slmops compare`: the base model against LoRA adapters on the same held-out data, as a markdown report."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compare")
@click.option(
    "-m", "--model", default=None, help="Base model: alias, local HF folder or hub id (default: smollm2-135m-instruct)."
)
@click.option(
    "-a",
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A PEFT adapter or `slmops finetune` output folder; repeat for several. NAME defaults to the folder's name.",
)
@click.option(
    "-d", "--data", required=True, help="Held-out SFT or preference file (the kind is read from its columns)."
)
@click.option(
    "--max-samples", type=click.IntRange(min=1), default=50, show_default=True, help="Use the first N examples."
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--max-length", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per prompt + answer."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--generate/--no-generate",
    default=True,
    show_default=True,
    help="Greedy generations (ROUGE-L for SFT data, side by side in the report).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the markdown report here (default: print it).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled sign-flip tests.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def compare_command(
    model, adapters, data, max_samples, max_new_tokens, max_length, batch_size, generate, output, seed, as_json
) -> None:
    """Compare the base model with adapters: loss, perplexity, preference accuracy, ROUGE-L, paired tests."""
    from slmops.core.privacy import go_offline

    go_offline()
    from slmops.cli.export import parse_named_paths
    from slmops.core.models import DEFAULT_MODEL, resolve_model
    from slmops.measuring.compare import CompareRequest, compare, render_markdown, to_json, write_report

    named = parse_named_paths(adapters, "--adapter")
    name = model or DEFAULT_MODEL
    result = compare(
        CompareRequest(
            model=name,
            model_path=resolve_model(name).path,
            adapters=named,
            data=data,
            max_samples=max_samples,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
            generate=generate,
            seed=seed,
        )
    )
    report = render_markdown(result)
    if output is not None:
        write_report(report, output)
        click.echo(f"Wrote {output}", err=True)
    if as_json:
        click.echo(to_json(result))
    elif output is None:
        click.echo(report, nl=False)
