"""`slmops package`: several bundles of one model (per execution provider / precision) as one ORT model package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command("package")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Package folder (`.ortpackage` is added when missing); must not exist.",
)
@click.option("--name", default=None, help="Package name in the manifests (default: the folder's name).")
@click.option("--version", "version", default="1.0", show_default=True, help="Package version in the manifests.")
@click.option("--json", "as_json", is_flag=True, help="Print the package manifest's summary as JSON.")
def package_command(bundles, output, name, version, as_json) -> None:
    """Assemble bundles (e.g. cpu-int4 and cuda-fp16 exports of one model) into an ORT model package
    with Olive's generate-model-package. Run it with `slmops generate PACKAGE --variant NAME`."""
    from slmops.shipping.package import build_package, package_path

    manifest = build_package(list(bundles), output, name, version)
    out: dict[str, Any] = {
        "package": str(package_path(output)),
        "variants": {v: m.target.execution_provider for v, m in manifest.variants.items()},
        "adapters": manifest.adapters,
        "files": len(manifest.files),
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"{out['package']}: {len(out['variants'])} variants "
        f"({', '.join(f'{v} on {ep}' for v, ep in out['variants'].items())}), "
        f"adapters: {', '.join(out['adapters']) or 'none'}, {out['files']} files hashed in slmops.json"
    )
