"""The manifests (slmops.json) of a bundle and of a model package, as typed records read once.

A bundle's manifest says what was built (base, target, quantization, KV cache, LoRA inputs), from
what (each adapter's source, recipe, data hashes and metrics), with what (versions), and the sha256
of every file. Readers get these models, never the raw JSON; unknown keys are refused, so the
writer and the readers cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slmops.core.errors import SlmopsError

MANIFEST = "slmops.json"
BUNDLE_FORMAT, PACKAGE_FORMAT = "slmops-bundle", "slmops-package"
FORMAT_VERSION = 1


class BundleError(SlmopsError):
    """The bundle is missing, incomplete, altered, or not for this machine."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


_R = TypeVar("_R", bound=Record)


class BaseInfo(Record):
    name: str
    source: str
    hub_id: Optional[str] = None
    path: str
    sha256: str
    architecture: Optional[str] = None  # transformers' class (core.architectures); absent in older bundles


class TargetInfo(Record):
    name: str
    device: str
    execution_provider: str
    adapters: bool = True  # can the runtime switch adapters there


class QuantizationInfo(Record):
    precision: str
    int4_algo: Optional[str] = None
    block_size: Optional[int] = None
    accuracy_level: Optional[int] = None
    lora: str = "float32, not quantized"


class KvCacheInfo(Record):
    dtype: str = "fp32"
    scheme: Optional[str] = None  # int8: how the scales apply, the calibration texts and margin
    scales: Optional[str] = None
    texts: Optional[int] = None
    max_tokens: Optional[int] = None
    models: list[str] = []
    margin: Optional[float] = None


class LoraInputs(Record):
    modules: list[str] = []
    layers: int = 0


class AdapterRecord(Record):
    file: str  # the .onnx_adapter, relative to the bundle
    source: str
    rank: int
    alpha: Optional[float] = None
    modules: list[str]
    layers: int
    recipe: Optional[str] = None  # from the finetune run, when the adapter came from `slmops finetune`
    method: Optional[str] = None
    stages: list[str] = []
    data: dict[str, dict[str, Optional[str]]] = {}
    metrics: dict[str, dict[str, Any]] = {}


class MergedRecord(Record):
    folder: str
    hf_folder: Optional[str] = None
    source: str


class BundleManifest(Record):
    format: Literal["slmops-bundle"] = "slmops-bundle"
    format_version: Literal[1] = 1
    created: str
    base: BaseInfo
    target: TargetInfo
    quantization: QuantizationInfo
    kv_cache: KvCacheInfo = KvCacheInfo()
    lora_inputs: LoraInputs = LoraInputs()
    adapters: dict[str, AdapterRecord] = {}
    merged: dict[str, MergedRecord] = {}
    export_seconds: Optional[float] = None
    versions: dict[str, Optional[str]] = {}
    precision_search: Optional[dict[str, Any]] = None  # --precision auto: every candidate measured
    files: dict[str, str] = {}  # path -> sha256, every file but the manifest

    @property
    def variant(self) -> str:
        """Its name in a package: target and precision, e.g. cpu-int4, cuda-fp16."""
        return f"{self.target.name}-{self.quantization.precision}"

    def adapter_file(self, bundle: Path, name: str) -> Path:
        return Path(bundle) / self.adapters[name].file

    def fidelity_sources(self) -> dict[str, str]:
        """Each adapter's (and merged variant's) recorded source folder, by name."""
        return {**{n: m.source for n, m in self.merged.items()}, **{n: a.source for n, a in self.adapters.items()}}


class VariantRecord(Record):
    folder: str
    target: TargetInfo
    quantization: QuantizationInfo
    source: str


class PackageManifest(Record):
    format: Literal["slmops-package"] = "slmops-package"
    format_version: Literal[1] = 1
    name: str
    version: str
    created: str
    base: BaseInfo
    adapters: list[str]
    variants: dict[str, VariantRecord]
    versions: dict[str, Optional[str]] = {}
    files: dict[str, str] = {}


def to_json(manifest: Record) -> str:
    return json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"


def read_manifest(folder: Path) -> BundleManifest:
    """The manifest of a bundle folder; a one-line BundleError when it is not a bundle."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle '{folder}' not found; pass the folder `slmops export -o` wrote")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"'{folder}' is not an slmops bundle (no {MANIFEST}); pass the folder `slmops export` wrote")
    raw = _json(path, "re-export the bundle")
    if raw.get("format") == PACKAGE_FORMAT:
        raise BundleError(
            f"'{folder}' is a model package, and this command takes a bundle; pass one of the bundles "
            "it was built from (generate, chat and serve take packages)"
        )
    return _parse(BundleManifest, raw, path, BUNDLE_FORMAT, "re-export the bundle")


def read_package_manifest(folder: Path) -> PackageManifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"'{folder}' is a model package that slmops did not write (no {MANIFEST}); build it with `slmops package`"
        )
    return _parse(PackageManifest, _json(path, "rebuild the package"), path, PACKAGE_FORMAT, "rebuild the package")


def _json(path: Path, fix: str) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc.__class__.__name__}); {fix}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path} is not an slmops manifest; {fix}")
    return raw


def _parse(model: type[_R], raw: dict, path: Path, kind: str, fix: str) -> _R:
    if raw.get("format") != kind:
        raise BundleError(f"{path} is not an {kind.replace('-', ' ')} manifest; {fix}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {raw.get('format_version')!r}, this slmops reads "
            f"{FORMAT_VERSION}; {fix} with this version"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "manifest"
        raise BundleError(f"{path}: '{where}' is missing or malformed ({err['msg']}); {fix}") from None
