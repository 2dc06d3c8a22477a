"""`slmops bench`: measure a bundle against PyTorch, llama.cpp and the memory bound, timed interleaved."""

from __future__ import annotations

from pathlib import Path

import click

from slmops.core.choices import TARGET_CHOICES
from slmops.core.errors import RunError


def parse_scenario(text: str):
    from slmops.measuring.bench import Scenario

    prompt, sep, new = text.partition(":")
    if not (sep and prompt.isdigit() and new.isdigit() and int(prompt) > 0 and int(new) > 1):
        raise RunError(f"--scenario '{text}': expected PROMPT:NEW token counts, e.g. 128:128 (NEW at least 2)")
    return Scenario(f"{prompt}in/{new}out", int(prompt), int(new))


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option(
    "--ep",
    "--target",
    "ep",
    type=click.Choice(TARGET_CHOICES),
    default=None,
    help="Execution provider to measure on (default: the bundle's target). Never falls back.",
)
@click.option("-a", "--adapter", "adapters", multiple=True, help="Adapters to measure ('base' for none; default all).")
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    metavar="PROMPT:NEW",
    help="Prompt and generated token counts (default 128:128, 1024:128 and 4096:128).",
)
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True, help="Measured runs per row.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads (default: all cores).")
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    type=click.Choice(["pytorch", "llamacpp", "none"]),
    help="Baselines to run (default pytorch; llamacpp needs llama-cpp-python).",
)
@click.option("--pytorch-reps", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--gguf",
    type=click.Path(path_type=Path),
    default=None,
    help="GGUF for the llama.cpp baseline (default: the one embedded for the default model).",
)
@click.option(
    "--no-lora-base/--skip-no-lora-base",
    default=True,
    help="Also measure the same base built without LoRA inputs (adapter overhead; built once).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Report folder (default: BUNDLE-bench next to the bundle).",
)
@click.option(
    "--matrix",
    is_flag=True,
    help="Export the recipe's (or --model's) adapters at each precision for each "
    "target available here, measure each, and print one comparison table.",
)
@click.option(
    "-r",
    "--recipe",
    default=None,
    help="With --matrix: the recipe (its model; adapters from --adapter NAME=PATH, else its newest finetune output).",
)
@click.option("-m", "--model", default=None, help="With --matrix: the base model (default: the recipe's).")
@click.option(
    "--precisions",
    default="int4,int8,fp32",
    show_default=True,
    help="With --matrix: precisions to try; int4:METHOD picks the int4 method (e.g. int4:rtn).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV instead of the table.")
def bench_command(
    bundle,
    ep,
    adapters,
    scenarios,
    reps,
    warmup,
    threads,
    baselines,
    pytorch_reps,
    gguf,
    no_lora_base,
    output,
    matrix,
    recipe,
    model,
    precisions,
    as_json,
    as_csv,
) -> None:
    """Measure a bundle: TTFT, prefill and decode speed, memory, adapter costs; vs PyTorch and llama.cpp."""
    from slmops.core.privacy import go_offline
    from slmops.measuring import bench as bench_mod
    from slmops.measuring.reports import table, to_csv, to_json, write_reports
    from slmops.shipping.manifest import read_manifest

    go_offline(olive=False)
    if as_json and as_csv:
        raise RunError("--json and --csv conflict; pass one")
    if matrix:
        return _matrix(
            bundle, recipe, model, adapters, precisions, scenarios, reps, warmup, threads, baselines, output, as_json
        )
    if bundle is None:
        raise RunError("no bundle: pass the folder `slmops export -o` wrote (or --matrix with --recipe)")
    if recipe or model:
        raise RunError("--recipe and --model go with --matrix; a bundle already names its model")
    manifest = read_manifest(bundle)
    options = bench_mod.BenchOptions(
        ep=ep,
        adapters=list(adapters) or None,
        reps=reps,
        warmup=warmup,
        pytorch_reps=pytorch_reps,
        scenarios=tuple(parse_scenario(s) for s in scenarios) or bench_mod.DEFAULT_SCENARIOS,
        pytorch="none" not in baselines and (not baselines or "pytorch" in baselines),
        llamacpp=str(_gguf(gguf, manifest)) if "llamacpp" in baselines else None,
        no_lora_base=no_lora_base,
    )
    if threads:
        options.threads = threads
    bench_mod.select_ep(ep, manifest)  # refuse an unavailable EP before any work
    quiet = as_json or as_csv
    total = bench_mod.planned_steps(options, manifest)
    report = bench_mod.bench(bundle, options, progress=(lambda m: None) if quiet else _progress(total))
    folder = output or bench_mod.bench_dir(bundle)
    written = write_reports(report, folder)
    if as_json:
        click.echo(to_json(report))
    elif as_csv:
        click.echo(to_csv(report), nl=False)
    else:
        click.echo(table(report))
        click.echo(f"reports: {', '.join(str(p) for p in written)}")


def _matrix(
    bundle, recipe, model, adapters, precisions, scenarios, reps, warmup, threads, baselines, output, as_json
) -> None:
    import json
    from dataclasses import asdict

    from slmops.cli.export import parse_named_paths
    from slmops.measuring import bench as bench_mod
    from slmops.measuring.reports import matrix_table, write_matrix
    from slmops.training.outputs import default_matrix_output, latest_run
    from slmops.training.recipe import load_recipe

    if bundle is not None:
        raise RunError("--matrix builds its own bundles: drop the BUNDLE argument")
    if not (recipe or model):
        raise RunError("--matrix needs --recipe R or --model M (and --adapter NAME=PATH for adapters)")
    r = load_recipe(recipe) if recipe else None
    named = parse_named_paths(adapters, "--adapter")
    if r and not named:
        assert r.name is not None  # load_recipe names every recipe
        named = {r.name: latest_run(r.name)}
    wanted = bench_mod.matrix_cells(precisions)
    options = bench_mod.BenchOptions(
        reps=reps,
        warmup=warmup,
        pytorch="none" not in baselines,
        scenarios=tuple(parse_scenario(s) for s in scenarios) or bench_mod.DEFAULT_SCENARIOS[:1],
    )
    if threads:
        options.threads = threads
    if model:
        name = model
    else:
        assert r is not None  # checked above: --matrix needs --recipe or --model
        name = r.model.name
    out = output or default_matrix_output(r.name if r and r.name is not None else Path(name).name)
    rows = bench_mod.matrix(name, named, wanted, options, out, progress=(lambda m: None) if as_json else _progress())
    written = write_matrix(rows, bench_mod.machine(), out, options.scenarios[0].name)
    if as_json:
        click.echo(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        click.echo(matrix_table(rows))
        click.echo(f"reports: {', '.join(str(p) for p in written)}")


def _gguf(gguf: Path | None, manifest) -> Path:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise RunError(
            "--baseline llamacpp needs llama-cpp-python: pip install 'slmops[llamacpp]' "
            "(it builds llama.cpp from source, about 5 minutes)"
        )
    if gguf is not None:
        if not gguf.is_file():
            raise RunError(f"--gguf {gguf}: no such file; pass a GGUF of the bundle's base model")
        return gguf
    from slmops.core.models import embedded_gguf

    return embedded_gguf(manifest.base.name)


def _progress(total: int | None = None):
    """[k/N] step lines on stderr, with the time since the start."""
    import time

    step, start = [0], time.monotonic()

    def say(message: str) -> None:
        step[0] += 1
        of = f"/{max(total, step[0])}" if total else ""
        click.echo(f"[{step[0]}{of}] {time.monotonic() - start:5.0f}s  {message}", err=True)

    return say
