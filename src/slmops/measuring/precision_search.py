"""`slmops export --precision auto`: build candidate precisions, measure each, keep the fastest that keeps the answers.

The candidates, in the order they decode on a CPU, fastest first (README, levers table): the model
builder's int4 RTN and k_quant_mixed, the source's own GGUF blocks (block 32), int8, GGUF blocks of 16, fp32.
Olive's SearchStrategy proposes them in that order (its sequential sampler, as `slmops sweep` with
`sampler: grid`). Each is exported with the adapters, its top-1 agreement with PyTorch fp32 is measured
(slmops.shipping.parity: base and every adapter, on the user's texts or the adapters' held-out rows) and its decode
speed is timed. The first to reach the floor on every row is kept, so no faster candidate did; the ones
after it are not built. Agreement on a CPU is deterministic, so the same inputs give the same choice; the
decode speed is measured for the table, which the bundle's manifest and model card record.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

from slmops.core.errors import RunError, SlmopsError
from slmops.shipping.manifest import BundleManifest, read_manifest
from slmops.shipping.parity import MAX_TEXTS, require_texts_file

# name -> Quantization fields, fastest first (one interleaved run on SmolLM2, README levers table; gguf-32 and
# int8 decode alike within the machine's drift, and gguf-32 is half the size, so it comes first)
CANDIDATES: dict[str, dict] = {
    "int4-rtn": {"precision": "int4", "int4_algo": "rtn", "block_size": 32},
    "int4-k_quant_mixed": {"precision": "int4", "int4_algo": "k_quant_mixed", "block_size": 32},
    "int4-gguf-32": {"precision": "int4", "int4_algo": "gguf", "block_size": 32},
    "int8": {"precision": "int8", "block_size": 32},
    "int4-gguf-16": {"precision": "int4", "int4_algo": "gguf", "block_size": 16},
    "fp32": {"precision": "fp32"},
}
TIMING = (128, 64, 2)  # prompt tokens, new tokens, timed runs (after one warm-up)


@dataclass
class Measured:
    name: str
    quantization: str
    status: str  # "chosen", "below the floor", "not built: a faster candidate met the floor", "not applicable: ..."
    agreement: dict[str, float] = field(default_factory=dict)  # row (base, adapter) -> top-1 agreement
    kl_mean: Optional[float] = None  # the base's
    decode_tps: Optional[float] = None  # the base's, 128 in / 64 out
    size_mb: Optional[float] = None  # the model's weights on disk


@dataclass
class SearchResult:
    min_agreement: float
    texts: str
    chosen: str
    candidates: list[Measured]


def applicable(req) -> dict[str, str]:
    """Candidate -> "" where it can be built for this model and target, else why not."""
    from slmops.shipping.export import GGUF_TARGETS
    from slmops.shipping.gguf_grid import on_grid

    gguf = req.target.name in GGUF_TARGETS and on_grid(req.model.path)
    reasons = {}
    for name, fields in CANDIDATES.items():
        if fields["precision"] not in req.target.precisions:
            reasons[name] = f"not applicable: target {req.target.name} does not take {fields['precision']}"
        elif fields.get("int4_algo") == "gguf" and not gguf:
            reasons[name] = "not applicable: the weights are not on a GGUF grid"
        else:
            reasons[name] = ""
    return reasons


def search(
    req,
    output: Path,
    min_agreement: float,
    texts: Optional[Path] = None,
    progress: Callable[[str], None] = lambda _: None,
):
    """Build the chosen bundle at `output` (atomically) with the table of candidates in its manifest.

    Returns (the chosen bundle's ExportResult, SearchResult)."""
    from slmops.core.files import atomic_dir
    from slmops.shipping import bundle as bundle_mod
    from slmops.shipping.export import export

    if texts is not None:
        require_texts_file(texts)
    reasons = applicable(req)
    table = {name: Measured(name, "", reason) for name, reason in reasons.items() if reason}
    chosen = None
    with atomic_dir(output) as tmp:
        work = tmp / ".candidates"
        for name in _proposals([n for n, reason in reasons.items() if not reason], table):
            if chosen:
                table[name] = Measured(name, "", "not built: a faster candidate met the floor")
                continue
            progress(f"candidate {name}")
            folder = work / name
            try:
                result = export(
                    replace(req, quant=replace(req.quant, float_layers=(), **CANDIDATES[name])), folder, progress=None
                )
            except SlmopsError as exc:  # one method failing to build (a model the builder cannot take) is a row
                table[name] = Measured(name, "", f"failed: {exc}")
                continue
            table[name] = measured = _measure(name, result.quantization, folder, min_agreement, texts, progress)
            if measured.status == "chosen":
                chosen, chosen_result = name, result
        if chosen is None:
            best = max(table.values(), key=lambda m: min(m.agreement.values(), default=0))
            raise RunError(
                f"no candidate reaches top-1 agreement {min_agreement:.1%} on every row (best: {best.name}, "
                f"{min(best.agreement.values(), default=0):.1%}); lower --min-agreement"
            )
        for item in (work / chosen).iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(work)
        outcome = SearchResult(
            min_agreement, _texts_label(texts), chosen, [table[name] for name in CANDIDATES if name in table]
        )
        manifest = read_manifest(tmp)
        manifest.precision_search = asdict(outcome)
        bundle_mod.write_bundle_metadata(tmp, manifest)
    chosen_result.bundle, chosen_result.precision_search = str(output), asdict(outcome)
    return chosen_result, outcome


def _texts_label(texts: Optional[Path]) -> str:
    return str(texts) if texts else f"held-out rows of the adapters' recipes (at most {MAX_TEXTS} each), else built-in"


def _proposals(names: list[str], table: dict) -> Iterator[str]:
    """Olive's search strategy over the candidates, in order; each one's result is fed back before the next."""
    from olive.evaluator.metric_result import MetricResult, SubMetricResult
    from olive.search.search_parameter import Categorical
    from olive.search.search_strategy import SearchStrategy

    strategy = SearchStrategy(
        {"execution_order": "joint", "sampler": "sequential", "sampler_config": {"max_samples": len(names)}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.initialize(
            {"export": [{"candidate": Categorical(names)}]},
            "base",
            {"export": {"decode_tps": {"higher_is_better": True, "goal": None, "priority": 1}}},
        )
        for sample in strategy:
            name = sample.passes_configs["export"]["params"]["candidate"]
            yield name
            measured = table[name]
            value = measured.decode_tps if measured.status == "chosen" else 0.0  # below the floor or failed
            signal = MetricResult(
                {"decode_tps": SubMetricResult(value=value or 0.0, priority=1, higher_is_better=True)}
            )
            strategy.record_feedback_signal(sample.search_point.index, signal, ["base"])


def _measure(name: str, quantization: str, bundle: Path, floor: float, texts: Optional[Path], progress) -> Measured:
    from slmops.core.models import resolve_model
    from slmops.shipping.parity import adapter_sources, check_parity

    manifest = read_manifest(bundle)
    report = check_parity(
        bundle,
        manifest,
        resolve_model(manifest.base.name).path,
        adapter_sources(manifest, {}),
        texts,
        floor,
        stop_below=True,
    )
    agreement = {row.name: round(row.agreement, 4) for row in report.rows}
    meets = report.rows and min(agreement.values()) >= floor and len(report.rows) == 1 + _rows(manifest)
    size = sum(f.stat().st_size for f in bundle.glob("model.onnx*")) / 2**20
    progress(f"  {name}: agreement {', '.join(f'{k} {v:.1%}' for k, v in agreement.items())}")
    return Measured(
        name,
        quantization,
        "chosen" if meets else "below the floor",
        agreement,
        round(report.rows[0].kl_mean, 5),
        round(decode_speed(bundle), 1),
        round(size, 1),
    )


def _rows(manifest: BundleManifest) -> int:
    return len(manifest.adapters) + len(manifest.merged)


def decode_speed(bundle: Path) -> float:
    """The base's decode tok/s on onnxruntime-genai (median of TIMING's runs, after a warm-up)."""
    import statistics

    from slmops.measuring.bench import BenchOptions, prompt_ids
    from slmops.measuring.runners import OrtRunner

    prompt, new, reps = TIMING
    runner = OrtRunner({"candidate": bundle}, {"candidate": ["base"]}, BenchOptions().threads)
    ids = prompt_ids(bundle, prompt)
    runs = [runner.run("candidate", "base", ids, new) for _ in range(reps + 1)][1:]
    return statistics.median(r["decode_tps"] for r in runs)
