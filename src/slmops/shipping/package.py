"""ORT model packages: several bundles of one model (one per execution provider or precision) in one folder.

`build_package` lays the bundles out with Olive's `generate-model-package` (the ORT model-package
proposal that Olive 0.13 writes):

    manifest.json                       Olive's package manifest
    configs/                            genai_config.json (shared part), tokenizer, chat template
    models/decoder/metadata.json        one entry per variant: its execution provider
    models/decoder/<variant>/           model.onnx (+ data), genai_config_overlay.json,
                                        adapters/ and bundle.json (that bundle's slmops manifest)
    slmops.json                         the package manifest: variants, provenance, sha256 of every file

Adapters go with their variant, since a CUDA fp16 model takes fp16 adapters and a CPU one float32.

No released onnxruntime-genai opens this layout itself: the PyPI wheels (0.14-0.18) are built
without ONNX Runtime's model-package API, and ONNX Runtime 1.32 reads a newer manifest schema than
Olive 0.13 writes (tests/test_export.py::test_no_released_runtime_opens_olives_package_layout
fails once one of them opens it). So `open_variant`
selects a variant as the package's metadata.json says and gives onnxruntime-genai a flat view of
it: the shared config with the variant's overlay applied (RFC 7386), next to links to the files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from slmops.shipping.bundle import FileCheck, check_files, hash_files, versions
from slmops.shipping.manifest import (
    MANIFEST,
    BundleError,
    BundleManifest,
    PackageManifest,
    VariantRecord,
    read_manifest,
    read_package_manifest,
    to_json,
)

SUFFIX = ".ortpackage"
COMPONENT = "decoder"  # a text-generation model has one genai role, so one package component
BUNDLE_MANIFEST = "bundle.json"


def is_package(path: Path) -> bool:
    path = Path(path)
    return (path / "manifest.json").is_file() and (path / "models").is_dir()


def package_path(output: Path) -> Path:
    """The output folder with Olive's `.ortpackage` suffix, which Olive adds when it is missing."""
    output = Path(output)
    return output if output.suffix == SUFFIX else output.with_name(output.name + SUFFIX)


def check_bundles(bundles: list[Path]) -> dict[str, tuple[Path, BundleManifest]]:
    """Variant name -> (bundle, manifest); a BundleError when the bundles cannot share one package."""
    if not bundles:
        raise BundleError("no bundles to package; pass one or more folders that `slmops export -o` wrote")
    variants: dict[str, tuple[Path, BundleManifest]] = {}
    for path in bundles:
        manifest = read_manifest(path)
        name = manifest.variant
        if name in variants:
            raise BundleError(
                f"bundles {variants[name][0]} and {path} are both {name}; a package holds one bundle "
                "per target and precision: package one of them"
            )
        if manifest.merged:
            raise BundleError(
                f"bundle {path} has merged models ({', '.join(manifest.merged)}), which a package "
                "does not carry; export that bundle without --merge to package it"
            )
        variants[name] = (Path(path), manifest)
    first_path, first = next(iter(variants.values()))
    for path, manifest in variants.values():
        if manifest.base.sha256 != first.base.sha256:
            raise BundleError(
                f"bundles {first_path} and {path} were exported from different base models; a "
                "package holds variants of one model"
            )
        if sorted(manifest.adapters) != sorted(first.adapters):
            raise BundleError(
                f"bundles {first_path} and {path} have different adapters "
                f"({', '.join(sorted(first.adapters)) or 'none'} vs "
                f"{', '.join(sorted(manifest.adapters)) or 'none'}); export the same adapters "
                "for every variant"
            )
        for name, adapter in manifest.adapters.items():
            if _adapter_identity(adapter) != _adapter_identity(first.adapters[name]):
                raise BundleError(
                    f"adapter '{name}' of {path} is not the one of {first_path} (another source, "
                    "rank or modules); export the same adapters for every variant"
                )
    return variants


def _adapter_identity(adapter) -> tuple:
    return adapter.source, adapter.rank, sorted(adapter.modules)


def build_package(
    bundles: list[Path], output: Path, name: Optional[str] = None, version: str = "1.0"
) -> PackageManifest:
    """Package the bundles into `output`.ortpackage (written whole or not at all); returns its manifest."""
    from slmops.core.files import atomic_dir

    variants = check_bundles(bundles)
    for path, bundle_manifest in variants.values():
        check = check_files(path, bundle_manifest.files)
        if not check.ok:
            raise BundleError(
                f"bundle {path} does not match its manifest ({len(check.missing)} missing, "
                f"{len(check.changed)} changed, {len(check.unlisted)} unlisted files); run "
                f"`slmops verify {path}` and re-export it"
            )
    target = package_path(output)
    name = name or target.stem
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory(prefix="slmops-package-") as staging:
        _olive_package(variants, Path(staging), tmp, name, version)
        for variant, (path, _) in variants.items():
            _move_variant_files(tmp, variant, path)
        manifest = _package_manifest(variants, name, version)
        manifest.files = hash_files(tmp)
        (tmp / MANIFEST).write_text(to_json(manifest))
    return manifest


def _olive_package(variants: dict, staging: Path, out: Path, name: str, version: str) -> None:
    """Olive names a variant after its source folder: link each bundle under its variant name."""
    from olive.cli.model_package import ModelPackageCommand

    from slmops.core.privacy import go_offline

    go_offline()  # ModelPackageCommand.run is an Olive telemetry action
    for variant, (path, _) in variants.items():
        (staging / variant).symlink_to(Path(path).absolute(), target_is_directory=True)
    written = out / f"olive{SUFFIX}"
    args = argparse.Namespace(
        source=[str(staging / v) for v in variants], output_path=str(written), model_name=name, model_version=version
    )
    olive_log = logging.getLogger("olive")
    level = olive_log.level
    if not logging.getLogger("slmops").isEnabledFor(logging.INFO):  # Olive logs every file it writes; -v shows it
        olive_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the temporary folder's name
            ModelPackageCommand(argparse.ArgumentParser(), args).run()
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise BundleError(
            f"Olive could not package the bundles: {str(exc).splitlines()[0]}; check them with "
            "`slmops verify` and re-export the one it names"
        ) from None
    finally:
        olive_log.setLevel(level)
    for child in written.iterdir():
        child.rename(out / child.name)
    written.rmdir()


def _move_variant_files(pkg: Path, variant: str, bundle: Path) -> None:
    """Olive copies the non-ONNX files of one source into configs/: adapters and provenance are per variant."""
    folder = pkg / "models" / COMPONENT / variant
    (folder / "adapters").mkdir()
    for adapter in sorted((bundle / "adapters").glob("*.onnx_adapter")):
        shutil.copy2(adapter, folder / "adapters" / adapter.name)
    shutil.copy2(bundle / MANIFEST, folder / BUNDLE_MANIFEST)
    if (bundle / "olive_config.json").is_file():
        shutil.copy2(bundle / "olive_config.json", folder / "olive_config.json")
    configs = pkg / "configs"
    shutil.rmtree(configs / "adapters", ignore_errors=True)
    for per_bundle in (MANIFEST, "olive_config.json", "README.md"):
        (configs / per_bundle).unlink(missing_ok=True)


def _package_manifest(variants: dict[str, tuple[Path, BundleManifest]], name: str, version: str) -> PackageManifest:
    first = next(iter(variants.values()))[1]
    return PackageManifest(
        name=name,
        version=version,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base=first.base,
        adapters=sorted(first.adapters),
        variants={
            v: VariantRecord(
                folder=f"models/{COMPONENT}/{v}",
                target=m.target,
                quantization=m.quantization,
                source=str(Path(p).absolute()),
            )
            for v, (p, m) in variants.items()
        },
        versions=versions(),
    )


def choose_variant(manifest: PackageManifest, wanted: Optional[str], available: list[str]) -> str:
    """The variant asked for, else the first one (in package order) whose device this machine has,
    a non-CPU one before CPU ones."""
    names = list(manifest.variants)
    if wanted is not None:
        if wanted not in names:
            raise BundleError(f"unknown variant '{wanted}'; this package has: {', '.join(names)}")
        return wanted
    runnable = [n for n in names if manifest.variants[n].target.name in available]
    if not runnable:
        raise BundleError(
            f"no variant of this package runs here: it has {', '.join(names)}, this machine's ONNX "
            f"Runtime has {', '.join(available)}; add a variant for one of those with `slmops package`"
        )
    return sorted(runnable, key=lambda n: manifest.variants[n].target.name == "cpu")[0]


def merge_patch(base, patch):
    """RFC 7386 JSON merge patch (what genai_config_overlay.json is)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def variant_genai_config(pkg: Path, variant: str) -> dict:
    """The variant's genai_config.json as a flat model folder has it: the shared part plus the variant's
    overlay, without the package's `component` pointers (onnxruntime-genai 0.14 rejects them)."""
    base = json.loads((pkg / "configs" / "genai_config.json").read_text())
    overlay = json.loads((pkg / "models" / COMPONENT / variant / "genai_config_overlay.json").read_text())
    config = merge_patch(base, overlay)
    for role in config["model"].values():
        if isinstance(role, dict):
            role.pop("component", None)
    return config


def open_variant(pkg: Path, variant: str, into: Path) -> Path:
    """Lay out `variant` of the package as a flat bundle in the empty folder `into` (links, no copies)."""
    pkg = Path(pkg).absolute()
    folder = pkg / "models" / COMPONENT / variant
    skip = {"genai_config.json", "genai_config_overlay.json", BUNDLE_MANIFEST}
    for item in [*(pkg / "configs").iterdir(), *folder.iterdir()]:  # the model's data resolves next to it
        if item.name not in skip:
            (into / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (into / "genai_config.json").write_text(json.dumps(variant_genai_config(pkg, variant), indent=2))
    (into / MANIFEST).symlink_to(folder / BUNDLE_MANIFEST)
    return into


def check_package(pkg: Path) -> tuple[PackageManifest, FileCheck]:
    """The package manifest and the check of every file against the sha256 it records."""
    manifest = read_package_manifest(pkg)
    return manifest, check_files(pkg, manifest.files)
