"""The bundle: model, tokenizer, adapters, and a manifest (slmops.json) with provenance and sha256 of every file.

Layout:
    model.onnx (+ model.onnx.data)  genai_config.json  tokenizer files  chat_template.jinja
    adapters/<name>.onnx_adapter    merged/<name>/ (optional)           hf/<name>/ (optional)
    olive_config.json               README.md (model card)               slmops.json (manifest)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from slmops.core.files import file_sha256, write_text
from slmops.shipping.manifest import (
    MANIFEST,
    BaseInfo,
    BundleManifest,
    KvCacheInfo,
    LoraInputs,
    MergedRecord,
    QuantizationInfo,
    TargetInfo,
    to_json,
)

_PACKAGES = ("slmops", "olive-ai", "onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers", "peft", "trl")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def new_manifest(req, adapters, modules: set[str], n_layers: int, result) -> BundleManifest:
    """The manifest of a freshly exported bundle (files are hashed when it is written)."""
    from slmops.core.architectures import architecture_name
    from slmops.core.models import model_fingerprint

    m, t, q = req.model, req.target, req.quant
    blocks = q.precision in ("int4", "int8")
    return BundleManifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base=BaseInfo(
            name=m.name,
            source=m.source,
            hub_id=m.hub_id,
            path=str(m.path),
            sha256=model_fingerprint(m.path),
            architecture=architecture_name(m.path),
        ),
        target=TargetInfo(name=t.name, device=t.device, execution_provider=t.provider, adapters=t.adapters),
        quantization=QuantizationInfo(
            precision=q.precision,
            int4_algo=q.int4_algo if q.precision == "int4" else None,
            block_size=q.block_size if blocks else None,
            accuracy_level=q.accuracy_level if blocks else None,
        ),
        kv_cache=KvCacheInfo.model_validate(result.kv_cache),
        lora_inputs=LoraInputs(modules=sorted(modules), layers=n_layers if modules else 0),
        adapters=result.adapters,
        merged={
            name: MergedRecord(
                folder=f"merged/{name}",
                hf_folder=f"hf/{name}" if req.hf_merged else None,
                source=str(next(a.path for a in adapters if a.name == name)),
            )
            for name in result.merged
        },
        export_seconds=result.seconds,
        versions=versions(),
    )


def write_bundle_metadata(folder: Path, manifest: BundleManifest) -> None:
    """Write README.md from the manifest, hash every file, then write slmops.json (temp file + rename)."""
    (folder / "README.md").write_text(model_card(manifest))
    manifest.files = hash_files(folder)
    write_text(folder / MANIFEST, to_json(manifest))


def hash_files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


@dataclass
class FileCheck:
    checked: int
    missing: list[str]
    changed: list[str]
    unlisted: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unlisted)


def check_files(folder: Path, expected: dict[str, str]) -> FileCheck:
    """Compare every file with the sha256 the manifest recorded (path -> sha256)."""
    actual = hash_files(folder)
    return FileCheck(
        checked=len(expected),
        missing=sorted(set(expected) - set(actual)),
        changed=sorted(name for name in set(expected) & set(actual) if actual[name] != expected[name]),
        unlisted=sorted(set(actual) - set(expected)),
    )


def model_card(m: BundleManifest) -> str:
    """README.md of a bundle, generated from its manifest."""
    q, t, base = m.quantization, m.target, m.base
    lines = [
        f"# {base.name}: ONNX Runtime GenAI bundle ({t.name}, {q.precision})",
        "",
        f"Built by slmops {m.versions.get('slmops')} with Olive {m.versions.get('olive-ai')} on {m.created}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base.name} ({base.hub_id or base.source}), weights sha256 `{base.sha256[:16]}` |",
        f"| architecture | {base.architecture or 'not recorded'} |",
        f"| target | {t.name} ({t.execution_provider}) |",
        f"| quantization | {_quant_text(q)}; LoRA weights float32 |",
        f"| KV cache | {_kv_text(m.kv_cache)} |",
        f"| LoRA inputs | {', '.join(m.lora_inputs.modules) or 'none'} |",
        "",
        "## Adapters",
        "",
    ]
    if m.adapters:
        lines += ["| name | rank | modules | recipe | stages | metrics |", "|---|---|---|---|---|---|"]
        for name, a in m.adapters.items():
            lines.append(
                f"| {name} | {a.rank} | {', '.join(a.modules)} | {a.recipe or '-'} | "
                f"{' -> '.join(a.stages) or '-'} | {_metrics_text(a.metrics)} |"
            )
    else:
        lines.append("None: the base model only.")
    if m.merged:
        lines += ["", "## Merged variants", ""] + [
            f"- `{v.folder}`: base with {n} merged in" + (f"; HF weights in `{v.hf_folder}`" if v.hf_folder else "")
            for n, v in m.merged.items()
        ]
    if m.precision_search:
        lines += _search_lines(m.precision_search)
    first = next(iter(m.adapters), None)
    lines += ["", "## Use", "", "```", "slmops generate BUNDLE --prompt 'Hello'"]
    if first:
        lines.append(f"slmops generate BUNDLE --adapter {first} --prompt 'Hello'")
    lines += [
        "slmops verify BUNDLE --parity",
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items() if v),
        "",
    ]
    return "\n".join(lines)


def _search_lines(search: dict) -> list[str]:
    """`--precision auto`'s candidates: what each measured, and which was kept."""
    lines = [
        "",
        "## Precision, chosen by measurement",
        "",
        f"The fastest candidate whose top-1 agreement with PyTorch fp32 reached {search['min_agreement']:.0%} on the "
        f"base and every adapter (texts: {search['texts']}).",
        "",
        "| candidate | quantization | top-1 agreement | KL mean | decode tok/s | weights MB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in search["candidates"]:
        agreement = ", ".join(f"{k} {v:.1%}" for k, v in c["agreement"].items()) or "-"
        lines.append(
            f"| {c['name']} | {c['quantization'] or '-'} | {agreement} | {_or_dash(c['kl_mean'])} | "
            f"{_or_dash(c['decode_tps'])} | {_or_dash(c['size_mb'])} | {c['status']} |"
        )
    return lines


def _or_dash(value) -> str:
    return "-" if value is None else f"{value:g}"


def _quant_text(q: QuantizationInfo) -> str:
    if q.precision == "int4":
        return f"int4 ({q.int4_algo}, block {q.block_size}, accuracy level {q.accuracy_level})"
    return q.precision


def _kv_text(kv: KvCacheInfo) -> str:
    if kv.dtype == "fp32":
        return "fp32"
    return (
        f"{kv.dtype} ({kv.scheme}), scales in `{kv.scales}` calibrated on {kv.texts} texts over "
        f"{', '.join(kv.models)}, margin {kv.margin}"
    )


def _metrics_text(metrics: dict) -> str:
    parts = []
    for stage, values in metrics.items():
        shown = [f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)) and k != "steps"]
        parts.append(f"{stage}: {values.get('steps', '?')} steps" + (", " + ", ".join(shown) if shown else ""))
    return "; ".join(parts) or "-"
