"""`slmops export` and `slmops verify`: build a bundle through Olive, and check one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from slmops.core.choices import (
    AUTO,
    BLOCK_SIZES,
    DEFAULT_MIN_AGREEMENT,
    INT4_ALGOS,
    KV_CACHES,
    PRECISION_CHOICES,
    TARGET_CHOICES,
)
from slmops.core.errors import RunError


def parse_named_paths(items: tuple[str, ...], flag: str) -> dict[str, Path]:
    """NAME=PATH pairs (a bare PATH is named after its folder)."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = name
            name = Path(path.rstrip("/")).name
            name = Path(path.rstrip("/")).parent.name if name == "adapter" else name
        if not name or not path or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise RunError(f"{flag} '{item}': expected NAME=PATH with a NAME of letters, digits, '-', '_' or '.'")
        if name in out:
            raise RunError(f"{flag} name '{name}' is given twice; give each adapter its own NAME=PATH")
        out[name] = Path(path)
    return out


@click.command("export")
@click.option(
    "-r",
    "--recipe",
    default=None,
    help="Recipe whose model and `export:` section to use; without "
    "--adapter, its newest finetune output under outputs/.",
)
@click.option(
    "-m", "--model", default=None, help="Base model: alias, local HF folder or hub id (default: the recipe's)."
)
@click.option(
    "-a",
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="A PEFT adapter or `slmops finetune` output folder; repeat for several.",
)
@click.option(
    "-t", "--target", type=click.Choice(TARGET_CHOICES), default=None, help="Hardware to build for (default cpu)."
)
@click.option(
    "-p",
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default=None,
    help="Precision of the base weights (default int4); LoRA weights stay float32. auto: build candidates, "
    "keep the fastest whose top-1 agreement with PyTorch reaches --min-agreement on the base and every adapter.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=None,
    help=f"With --precision auto: the agreement floor (default {DEFAULT_MIN_AGREEMENT}).",
)
@click.option(
    "--texts",
    type=click.Path(path_type=Path),
    default=None,
    help="With --precision auto: texts to measure agreement on (as `verify --texts`; default: the "
    "adapters' held-out rows, else the built-in texts).",
)
@click.option(
    "--int4-algo",
    type=click.Choice(INT4_ALGOS),
    default=None,
    help="int4 method (default auto: gguf, the source's own blocks kept exactly, for a model dequantized "
    "from a GGUF; else k_quant_mixed, sensitive layers and lm_head in int8).",
)
@click.option(
    "--float-layers",
    default=None,
    metavar="I,J",
    help="With --int4-algo gguf: decoder layers kept in fp32 (the ones that cost the most agreement).",
)
@click.option(
    "--block-size",
    type=click.Choice([str(b) for b in BLOCK_SIZES]),
    default=None,
    help="Quantization block size (default 32; 16 halves the int8 activations' blocks: README, levers).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits accuracy level (default 4: int8 compute on CPU).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(KV_CACHES),
    default=None,
    help="Element type of the KV cache: int8 calibrates per-layer scales on the base and every adapter "
    "(default: the target's, chosen by measurement; cpu and cuda quantize it).",
)
@click.option(
    "--lora-modules",
    default=None,
    help="Comma-separated modules that get LoRA inputs "
    "(default: those the adapters train); wider lets later --into adapters fit.",
)
@click.option("--merge", "merge", multiple=True, metavar="NAME", help="Also build a model with this adapter merged in.")
@click.option("--hf-merged", is_flag=True, help="With --merge: also write the merged HF weights (hf/NAME).")
@click.option(
    "--into",
    "into",
    type=click.Path(path_type=Path),
    default=None,
    help="Add the adapters to this existing bundle without rebuilding the base.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Bundle folder; must not exist.")
@click.option("--dry-run", is_flag=True, help="Write the Olive configs and have Olive validate them, build nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_command(
    recipe,
    model,
    adapters,
    target,
    precision,
    min_agreement,
    texts,
    int4_algo,
    float_layers,
    block_size,
    accuracy_level,
    kv_cache,
    lora_modules,
    merge,
    hf_merged,
    into,
    output,
    dry_run,
    as_json,
) -> None:
    """Export a base model and its adapters to an ONNX Runtime GenAI bundle, through Olive."""
    from slmops.core.models import DEFAULT_MODEL, needs_hub, resolve_model
    from slmops.core.privacy import go_offline
    from slmops.shipping.export import add_adapters, export, export_request
    from slmops.training.outputs import latest_run
    from slmops.training.recipe import ExportSection, load_recipe

    named = parse_named_paths(adapters, "--adapter")
    r = load_recipe(recipe) if recipe else None
    if r and not named and not into:
        assert r.name is not None  # load_recipe names every recipe
        named = {r.name: latest_run(r.name)}
    settings = r.export if r else ExportSection()
    model_name = model or (r.model.name if r else None)
    if into:
        _refuse_with_into(
            output,
            target,
            precision,
            min_agreement,
            texts,
            int4_algo,
            float_layers,
            block_size,
            accuracy_level,
            kv_cache,
            lora_modules,
            merge,
            dry_run,
        )
        if not named:
            raise RunError("--into needs at least one --adapter NAME=PATH to add")
    if not (into or output):
        raise RunError("no output folder: pass -o BUNDLE (or --into BUNDLE to add adapters to one)")
    go_offline(allow_hub=bool(model_name and needs_hub(model_name)))
    progress = (lambda msg: click.echo(f"... {msg}", err=True)) if not as_json else None
    if into:
        from slmops.shipping.manifest import read_manifest

        base = model_name or read_manifest(into).base.name
        manifest = add_adapters(into, named, resolve_model(base), progress=progress)
        click.echo(
            json.dumps({"bundle": str(into), "adapters": list(manifest.adapters)}, indent=2)
            if as_json
            else f"Added {', '.join(named)} to {into}; adapters now: {', '.join(manifest.adapters)}"
        )
        return
    req = export_request(
        model_name or DEFAULT_MODEL,
        named,
        settings,
        target=target,
        precision=precision,
        int4_algo=int4_algo,
        block_size=block_size,
        accuracy_level=accuracy_level,
        kv_cache=kv_cache,
        float_layers=_layers(float_layers) if float_layers is not None else None,
        lora_modules=_modules(lora_modules),
        merge=merge,
        hf_merged=hf_merged,
    )
    quant = req.quant
    floor = min_agreement if min_agreement is not None else settings.min_agreement
    if quant.precision == AUTO:
        if any(option not in (None, ()) for option in (int4_algo, float_layers, block_size, accuracy_level)):
            raise RunError(
                "--precision auto chooses the int4 method, block size and accuracy level itself: drop "
                "--int4-algo, --block-size, --accuracy-level and --float-layers, or name a precision"
            )
        if dry_run:
            raise RunError("--precision auto builds and measures its candidates: drop --dry-run, or name a precision")
        from slmops.measuring.precision_search import search

        quiet = lambda _: None  # --json: no progress lines
        result, outcome = search(
            req, output, DEFAULT_MIN_AGREEMENT if floor is None else floor, texts, progress or quiet
        )
        if not as_json:
            click.echo(_search_table(outcome))
    elif floor is not None or texts:
        raise RunError("--min-agreement and --texts choose among candidates: add --precision auto")
    else:
        result = export(req, output, dry_run=dry_run, progress=progress)
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    verb = "Validated the Olive config(s) for" if dry_run else "Exported"
    click.echo(f"{verb} {req.model.name} -> {output} ({result.target}, {result.quantization})")
    for name, record in result.adapters.items():
        click.echo(f"  adapter {name:<16} r={record['rank']} {', '.join(record['modules'])}")
    for name in result.merged:
        click.echo(f"  merged  {name:<16} merged/{name}")
    for cfg in result.olive_configs:
        click.echo(f"  olive config  {output / cfg}")
    if not dry_run:
        click.echo(f"  time          {result.seconds:.1f} s\n  next          slmops generate {output} --prompt 'Hello'")


def _search_table(outcome) -> str:
    lines = [
        f"precision candidates (top-1 agreement floor {outcome.min_agreement:.0%}, texts: {outcome.texts}):",
        f"  {'candidate':<20} {'lowest agree':>12} {'KL mean':>8} {'decode tok/s':>12} {'MB':>6}  status",
    ]
    for m in outcome.candidates:
        low = f"{min(m.agreement.values()):.1%}" if m.agreement else "-"
        lines.append(
            f"  {m.name:<20} {low:>12} {m.kl_mean if m.kl_mean is not None else '-':>8} "
            f"{m.decode_tps if m.decode_tps is not None else '-':>12} "
            f"{m.size_mb if m.size_mb is not None else '-':>6}  {m.status}"
        )
    return "\n".join(lines)


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise RunError(f"--float-layers '{text}': expected layer numbers separated by commas, e.g. 0,3") from None


def _modules(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _refuse_with_into(output, *build_options) -> None:
    if output:
        raise RunError("--into and -o conflict: --into adds to an existing bundle, -o builds a new one; pass one")
    if any(option not in (None, (), False) for option in build_options):
        raise RunError(
            "--into only adds adapters; the base's options (target, precision, quantization, KV cache, "
            "--lora-modules, --merge, --dry-run) are fixed by the bundle: drop them"
        )


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--parity", is_flag=True, help="Also compare logits with PyTorch + PEFT (base and every adapter).")
@click.option("-m", "--model", default=None, help="Base model for --parity (default: the one the bundle records).")
@click.option(
    "-a",
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="PEFT adapter for --parity where the recorded source moved.",
)
@click.option(
    "--texts",
    type=click.Path(path_type=Path),
    default=None,
    help="With --parity: your own texts (.txt, or .jsonl/.json/.csv/.parquet rows in any format finetune "
    "reads); default: the held-out rows of the adapters' recipes, else the built-in texts.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=None,
    help="With --parity: fail (exit 1) where the base or an adapter agrees with PyTorch less often.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(bundle, parity, model, adapters, texts, min_agreement, as_json) -> None:
    """Check every file of a bundle (or model package) against its manifest, and optionally its fidelity."""
    from slmops.core.errors import CheckFailed
    from slmops.shipping.bundle import check_files
    from slmops.shipping.manifest import BundleError, BundleManifest, PackageManifest, read_manifest
    from slmops.shipping.package import check_package, is_package

    if (texts or min_agreement is not None) and not parity:
        raise RunError("--texts and --min-agreement set up the --parity check: add --parity")
    if texts:
        from slmops.shipping.parity import require_texts_file

        require_texts_file(texts)

    manifest: BundleManifest | PackageManifest
    if is_package(bundle):
        if parity:
            raise BundleError("--parity runs on a bundle; pass one of the bundles this package was built from")
        manifest, files = check_package(bundle)
    else:
        manifest = read_manifest(bundle)
        files = check_files(bundle, manifest.files)
    problems = [
        f"{kind} {name}"
        for kind, names in (
            ("changed:", files.changed),
            ("missing:", files.missing),
            ("not in the manifest:", files.unlisted),
        )
        for name in names
    ]
    out = {"bundle": str(bundle), "files_checked": files.checked, "file_problems": problems}
    if problems:
        raise BundleError(
            f"bundle {bundle} fails verification: {'; '.join(problems)}; re-export it (or restore the files)"
        )
    if not as_json:
        click.echo(f"{bundle}: {files.checked} files match their sha256 in slmops.json")
    if parity:
        report = _parity(bundle, manifest, model, adapters, texts, min_agreement)
        out["parity"] = asdict(report)
        if not as_json:
            click.echo(_parity_table(report))
        if not report.ok:
            if as_json:
                click.echo(json.dumps(out, indent=2))
            raise CheckFailed(f"parity check failed: {'; '.join(report.failures)}")
    if as_json:
        click.echo(json.dumps(out, indent=2))


def _parity(bundle, manifest, model, adapters, texts=None, min_agreement=None):
    from slmops.core.models import resolve_model
    from slmops.core.privacy import go_offline
    from slmops.shipping.parity import adapter_sources, check_parity

    go_offline(olive=False)
    base = resolve_model(model or manifest.base.name)
    sources = adapter_sources(manifest, parse_named_paths(adapters, "--adapter"))
    return check_parity(bundle, manifest, base.path, sources, texts, min_agreement)


def _parity_table(report) -> str:
    lines = [
        f"parity vs PyTorch fp32 ({report.precision} bundle, {report.kv_cache} KV cache, {report.texts} texts: "
        f"{report.source}):",
        f"  {'':<16} {'positions':>9} {'top-1 agree':>11} {'KL mean':>8} {'KL p99':>8} {'ppl':>8} "
        f"{'ppl PyTorch':>11} {'max |dlogit|':>12}",
    ]
    for row in report.rows:
        lines.append(
            f"  {row.name:<16} {row.positions:>9} {row.agreement:>11.1%} {row.kl_mean:>8.4f} "
            f"{row.kl_p99:>8.3f} {row.ppl:>8.2f} {row.ppl_reference:>11.2f} {row.max_abs_diff:>12.2e}"
        )
    lines.append("  result: " + ("pass" if report.ok else "FAIL: " + "; ".join(report.failures)))
    return "\n".join(lines)
