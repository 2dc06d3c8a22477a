"""Measure a bundle: per execution provider, adapter and prompt length, against PyTorch, llama.cpp and the memory bound.

Every engine gets the same token ids (a fixed text cut to N tokens) and generates exactly M new
tokens, greedily. All engines are timed in one child process, taking turns (slmops.measuring.runners.interleaved);
each engine's peak RSS is measured alone, in a process of its own.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from slmops.core.choices import PROVIDERS, available_targets
from slmops.core.errors import SlmopsError
from slmops.measuring.runners import jobs
from slmops.shipping.manifest import BundleError, BundleManifest, read_manifest

TEXT = (
    "The history of the lighthouse is a history of people who kept a light burning through the night so that "
    "others could find their way home. Keepers trimmed wicks, polished lenses and wound the clockwork that turned "
    "the great glass, and they wrote down the weather, the ships that passed and the storms that came. "
)


@dataclass(frozen=True)
class Scenario:
    name: str
    prompt_tokens: int
    new_tokens: int


DEFAULT_SCENARIOS = (
    Scenario("128in/128out", 128, 128),
    Scenario("1024in/128out", 1024, 128),
    Scenario("4096in/128out", 4096, 128),
)


@dataclass
class BenchOptions:
    ep: Optional[str] = None  # default: the bundle's target
    adapters: Optional[list[str]] = None  # default: base and every adapter
    scenarios: tuple[Scenario, ...] = DEFAULT_SCENARIOS
    warmup: int = 1
    reps: int = 3
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    pytorch: bool = True
    pytorch_reps: int = 1
    llamacpp: Optional[str] = None  # a GGUF path: also measure llama.cpp
    no_lora_base: bool = True  # build the same base without LoRA inputs, for the adapter overhead


@dataclass
class Row:
    engine: str  # onnxruntime-genai, pytorch, llama.cpp
    variant: str  # "int4 cpu", "fp32", "Q4_1 gguf", "int4 cpu, no LoRA inputs"
    adapter: str  # "base" or the adapter name
    scenario: str
    prompt_tokens: int
    new_tokens: int
    runs: int
    ttft_ms: float
    prefill_tps: Optional[float]
    decode_tps: float
    decode_tps_min: float
    decode_tps_max: float
    e2e_ms: float
    peak_rss_mb: Optional[float] = None
    disk_mb: Optional[float] = None
    bound_fraction: Optional[float] = None  # decode tok/s / memory-bandwidth bound


@dataclass
class Report:
    bundle: str
    machine: dict
    options: dict
    bandwidth_gbs: float
    bytes_per_token: dict  # adapter -> bytes read per decoded token (weights + adapter + KV cache)
    rows: list[Row] = field(default_factory=list)
    adapter_load_ms: dict = field(default_factory=dict)
    adapter_switch_ms: Optional[float] = None
    adapter_overhead: dict = field(default_factory=dict)  # adapter -> decode slowdown vs the no-LoRA base
    summary: dict = field(default_factory=dict)
    kv_cache: str = "fp32"  # the bundle's KV cache element type


def bench(
    bundle: Path,
    options: BenchOptions,
    progress: Callable[[str], None] = lambda _: None,
    workdir: Optional[Path] = None,
) -> Report:
    """Measure the bundle and the baselines, interleaved in one child process; memory of each apart."""
    manifest = read_manifest(bundle)
    ep = select_ep(options.ep, manifest)
    names = _adapters(options.adapters, manifest)
    options.scenarios = fitting_scenarios(bundle, options.scenarios, progress)
    scenarios = [
        {"name": s.name, "ids": prompt_ids(bundle, s.prompt_tokens), "new_tokens": s.new_tokens}
        for s in options.scenarios
    ]
    common = {"scenarios": scenarios, "reps": options.reps, "warmup": options.warmup, "threads": options.threads}
    progress("memory read bandwidth")
    bandwidth = run_engine({"engine": "bandwidth", "threads": options.threads})[0]["gbs"]
    report = Report(
        str(bundle),
        machine(),
        {**asdict(options), "ep": ep},
        bandwidth,
        {n: bytes_per_token(bundle, manifest, n, options.scenarios[0]) for n in names},
        kv_cache=manifest.kv_cache.dtype,
    )
    engines = {"onnxruntime-genai": _ort_engine(bundle, manifest, names, options, progress, workdir)}
    if options.pytorch:
        engines["pytorch"] = _torch_engine(manifest, names)
    if options.llamacpp:
        engines["llama.cpp"] = {"gguf": options.llamacpp}
    progress(f"interleaved: {', '.join(engines)} ({options.reps} reps of {len(scenarios)} scenario(s))")
    result, _ = run_engine(
        {"engine": "interleaved", "engines": engines, **common, "pytorch_reps": options.pytorch_reps}
    )
    report.adapter_load_ms, report.adapter_switch_ms = result["adapter_load_ms"], result["adapter_switch_ms"]
    progress("peak memory of each engine alone")
    _add_engine_rows(report, bundle, manifest, engines, result["samples"], common, options)
    report.summary, report.adapter_overhead = summarise(report)
    return report


def _ort_engine(bundle, manifest, names, options, progress, workdir) -> dict:
    """The bundle, and the same base without LoRA inputs (the adapter overhead's reference)."""
    variant = f"{manifest.quantization.precision} {manifest.target.name}"
    bundles, measured = {variant: str(bundle)}, {variant: names}
    if options.no_lora_base and manifest.lora_inputs.modules:
        plain = no_lora_bundle(bundle, manifest, workdir or bench_dir(bundle), progress)
        bundles[f"{variant}, no LoRA inputs"], measured[f"{variant}, no LoRA inputs"] = str(plain), ["base"]
    return {"bundles": bundles, "adapters": measured}


def _torch_engine(manifest, names) -> dict:
    from slmops.core.models import resolve_model
    from slmops.shipping.parity import adapter_sources

    model = resolve_model(manifest.base.name).path
    sources = adapter_sources(manifest, {}) if len(names) > 1 else {}
    return {"model": str(model), "adapters": {n: str(p) for n, p in sources.items() if n in names}}


def _add_engine_rows(report, bundle, manifest, engines, samples, common, options) -> None:
    """Rows per (engine, variant, adapter), each with the peak RSS of that engine (and variant) alone: a
    short run of the longest scenario in its own process."""
    longest = max(common["scenarios"], key=lambda s: len(s["ids"]))
    alone = dict(common, scenarios=[dict(longest, new_tokens=2)], reps=1, warmup=0)
    for engine, args in engines.items():
        parts = (
            [{"bundles": {v: p}, "adapters": {v: args["adapters"][v]}} for v, p in args["bundles"].items()]
            if engine == "onnxruntime-genai"
            else [args]
        )
        for part in parts:
            _, rss = run_engine({"engine": "interleaved", "engines": {engine: part}, **alone})
            for variant, adapter in jobs(engine, part):
                picked = [s for s in samples if s["engine"] == engine and s["variant"] == variant]
                _add_rows(
                    report,
                    engine,
                    variant,
                    picked,
                    [adapter],
                    options.scenarios,
                    peak_rss_mb=rss,
                    disk_mb=_disk_mb(engine, part, variant, adapter, bundle, manifest),
                )
    for row in report.rows:
        if row.engine == "onnxruntime-genai" and "no LoRA" not in row.variant:
            row.bound_fraction = row.decode_tps / (report.bandwidth_gbs * 1e9 / report.bytes_per_token[row.adapter])


def _disk_mb(engine, args, variant, adapter, bundle, manifest) -> float:
    if engine == "onnxruntime-genai":
        adapter_mb = 0 if adapter == "base" else manifest.adapter_file(bundle, adapter).stat().st_size / 2**20
        return bundle_bytes(Path(args["bundles"][variant])) / 2**20 + adapter_mb
    if engine == "pytorch":
        return sum(f.stat().st_size for f in Path(args["model"]).glob("*.safetensors")) / 2**20
    return Path(args["gguf"]).stat().st_size / 2**20


def fitting_scenarios(bundle: Path, scenarios, progress) -> tuple[Scenario, ...]:
    """The scenarios that fit the model's context: a default one that does not is dropped (said), one asked for
    is refused."""
    from slmops.shipping.runtime import context_length

    limit = context_length(bundle)
    too_long = [s for s in scenarios if s.prompt_tokens + s.new_tokens > limit]
    if too_long and scenarios is not DEFAULT_SCENARIOS:
        raise BundleError(
            f"scenario {', '.join(s.name for s in too_long)} is longer than the model's context of "
            f"{limit} tokens; pass shorter --scenario PROMPT:NEW values"
        )
    for s in too_long:
        progress(f"skipping scenario {s.name}: longer than the model's context of {limit} tokens")
    fitting = tuple(s for s in scenarios if s not in too_long)
    if not fitting:
        raise BundleError(f"no default scenario fits the model's context of {limit} tokens; pass --scenario PROMPT:NEW")
    return fitting


def planned_steps(options: BenchOptions, manifest: BundleManifest) -> int:
    """How many progress messages bench() will give (for a [k/N] display)."""
    return 3  # bandwidth, the interleaved run, memory (+1 if the no-LoRA base must be built)


def select_ep(requested: Optional[str], manifest: BundleManifest) -> str:
    """The EP to measure on: it must be available here and be the one the bundle was built for."""
    available = available_targets()
    ep = requested or manifest.target.name
    if ep not in available:
        raise BundleError(
            f"execution provider {ep} is not available here (ONNX Runtime "
            f"{_version('onnxruntime')} has: {', '.join(available)}); pick one of those "
            "or run on a machine with that device"
        )
    if PROVIDERS[ep][0] != manifest.target.execution_provider:
        raise BundleError(
            f"this bundle is built for {manifest.target.name}, not {ep}; export one for "
            f"{ep} (slmops export --target {ep}) or drop --ep"
        )
    return ep


def _adapters(requested: Optional[list[str]], manifest: BundleManifest) -> list[str]:
    names = ["base", *manifest.adapters]
    if requested:
        unknown = [n for n in requested if n not in names]
        if unknown:
            raise BundleError(f"unknown adapter(s) {', '.join(unknown)}; this bundle has: {', '.join(names)}")
        return [n for n in names if n in requested]
    return names


def prompt_ids(bundle: Path, n: int) -> list[int]:
    """Exactly n token ids of a fixed English text (repeated as needed), with the bundle's tokenizer."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _add_rows(
    report: Report, engine: str, variant: str, samples: list[dict], adapters: list[str], scenarios, **extra
) -> None:
    for name in adapters:
        for scenario in scenarios:
            picked = [s for s in samples if s["adapter"] == name and s["scenario"] == scenario.name]
            if picked:
                report.rows.append(_row(engine, variant, name, scenario, picked, **extra))


def _row(engine: str, variant: str, adapter: str, scenario: Scenario, samples: list[dict], **extra) -> Row:
    def median(key):
        values = [s[key] for s in samples if s[key] is not None]
        return statistics.median(values) if values else None

    decode = [s["decode_tps"] for s in samples]
    return Row(
        engine,
        variant,
        adapter,
        scenario.name,
        scenario.prompt_tokens,
        scenario.new_tokens,
        len(samples),
        median("ttft_ms"),
        median("prefill_tps"),
        median("decode_tps"),
        min(decode),
        max(decode),
        median("e2e_ms"),
        **extra,
    )


def no_lora_bundle(bundle: Path, manifest: BundleManifest, workdir: Path, progress) -> Path:
    """The same base and quantization without LoRA inputs, exported once (cached by the bundle's manifest)."""
    from slmops.core.files import file_sha256
    from slmops.shipping.export import export_request

    out = workdir / f"no-lora-{file_sha256(bundle / 'slmops.json')[:12]}"
    if not (out / "slmops.json").is_file():
        progress("building the same base without LoRA inputs (once)")
        q = manifest.quantization
        req = export_request(
            manifest.base.name,
            {},
            target=manifest.target.name,
            precision=q.precision,
            int4_algo=q.int4_algo,
            block_size=q.block_size,
            accuracy_level=q.accuracy_level,
            kv_cache=manifest.kv_cache.dtype,
        )
        _export(req, out, "--skip-no-lora-base to go without")
    return out


def _export(req, out: Path, otherwise: str) -> None:
    from slmops.shipping.export import export_in_child

    try:
        export_in_child(req, out)
    except Exception as exc:  # a SlmopsError's one line, or a crash in the child (BrokenProcessPool, ...)
        why = str(exc) if isinstance(exc, SlmopsError) else f"{type(exc).__name__}: {exc}"
        raise BundleError(
            f"export of {req.model.name} for {req.target.name} {req.quant.describe()} failed: {why}; pass {otherwise}"
        ) from None


def run_engine(args: dict) -> tuple[dict, float]:
    """Run one engine in a child process; its JSON result and its own peak RSS in MiB."""
    done = subprocess.run(
        [sys.executable, "-m", "slmops.measuring.runners", json.dumps(args)], capture_output=True, text=True
    )
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"the {args['engine']} measurement failed: {last}")
    result = json.loads(done.stdout)
    return result, result.pop("peak_rss_mb")


# ---------------------------------------------------------------------------------------------
# The matrix: one recipe's adapters exported at each precision for each target available here


@dataclass
class MatrixRow:
    target: str
    precision: str
    adapter: str
    agreement: Optional[float]  # top-1 agreement with PyTorch fp32 (slmops.shipping.parity)
    decode_tps: float
    prefill_tps: Optional[float]
    ttft_ms: float
    x_pytorch: Optional[float]
    disk_mb: Optional[float]
    peak_rss_mb: Optional[float]
    bundle: str
    kl_mean: Optional[float] = None  # KL(PyTorch || bundle) of the next token, nats (slmops.shipping.parity)


def matrix_cells(precisions: str) -> list[str]:
    """`--precisions int4,int8,int4:rtn`: the precisions to try; int4:METHOD names the int4 method."""
    from slmops.core.choices import INT4_ALGOS, PRECISIONS

    known = {*PRECISIONS, *(f"int4:{a}" for a in INT4_ALGOS)}
    wanted = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in wanted if p not in known]
    if bad or not wanted:
        named = ", ".join(bad) or repr(precisions)
        raise BundleError(
            f"--precisions {named}: choose from {', '.join(PRECISIONS)}, or "
            f"int4:METHOD with METHOD one of {', '.join(INT4_ALGOS)}"
        )
    return wanted


def matrix(
    model: str,
    adapters: dict[str, Path],
    precisions: list[str],
    options: BenchOptions,
    out: Path,
    progress: Callable[[str], None] = lambda _: None,
) -> list[MatrixRow]:
    """Export and measure every (target available here, precision it takes); PyTorch is measured once."""
    from slmops.core.models import resolve_model
    from slmops.shipping.export import TARGETS, export_request
    from slmops.shipping.parity import adapter_sources, check_parity

    targets = [t for t in available_targets() if t in TARGETS]
    cells = [(t, p) for t in targets for p in precisions if p.partition(":")[0] in TARGETS[t].precisions]
    if not cells:
        raise BundleError(
            f"no precision in {', '.join(precisions)} fits the targets available here ({', '.join(targets)})"
        )
    rows, torch_tps = [], {}
    for i, (target, precision) in enumerate(cells):
        bundle = out / f"{target}-{precision.replace(':', '-')}"
        if not (bundle / "slmops.json").is_file():
            progress(f"export {target} {precision}")
            bits, _, algo = precision.partition(":")  # int4:k_quant_mixed names the int4 method
            req = export_request(model, adapters, target=target, precision=bits, int4_algo=algo or None)
            _export(req, bundle, "other --precisions")
        cell = BenchOptions(
            **{
                **asdict(options),
                "pytorch": options.pytorch and i == 0,
                "ep": target,
                "scenarios": options.scenarios[:1],
                "no_lora_base": False,
            }
        )
        report = bench(bundle, cell, progress)
        manifest = read_manifest(bundle)
        progress(f"parity {target} {precision}")
        parity = check_parity(bundle, manifest, resolve_model(model).path, adapter_sources(manifest, {}))
        agreement = {r.name: r.agreement for r in parity.rows}
        kl = {r.name: r.kl_mean for r in parity.rows}
        torch_tps.update({r.adapter: r.decode_tps for r in report.rows if r.engine == "pytorch"})
        for r in report.rows:
            if r.engine == "onnxruntime-genai":
                x = r.decode_tps / torch_tps[r.adapter] if torch_tps.get(r.adapter) else None
                rows.append(
                    MatrixRow(
                        target,
                        precision.replace(":", " "),
                        r.adapter,
                        agreement.get(r.adapter),
                        r.decode_tps,
                        r.prefill_tps,
                        r.ttft_ms,
                        x,
                        r.disk_mb,
                        r.peak_rss_mb,
                        str(bundle),
                        kl.get(r.adapter),
                    )
                )
    return rows


# ---------------------------------------------------------------------------------------------
# The machine and its memory bound


def bundle_bytes(bundle: Path) -> int:
    """The base model's bytes on disk: model.onnx and its external data."""
    return sum(p.stat().st_size for p in bundle.glob("model.onnx*"))


def bytes_per_token(bundle: Path, manifest: BundleManifest, adapter: str, scenario: Scenario) -> float:
    """Bytes a decode step must read: the weights, the active adapter, and the KV cache at mid-generation."""
    decoder = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
    io_bytes = 2 if manifest.quantization.precision == "fp16" else 4
    cache_bytes = 1 if manifest.kv_cache.dtype == "int8" else io_bytes
    context = scenario.prompt_tokens + scenario.new_tokens // 2
    kv = (
        2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * context * cache_bytes
    )
    weights = weight_bytes_read(bundle / "model.onnx")
    if adapter != "base":
        weights += manifest.adapter_file(bundle, adapter).stat().st_size
    return weights + kv


def weight_bytes_read(model_file: Path) -> int:
    """Bytes of the graph's weights one token reads: all of each, but one row of an embedding table (a Gather's).

    SmolLM2's fp32 embedding table is half the int4 bundle's bytes, and a token reads 2 KB of it.
    """
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total = 0
    for tensor in graph.initializer:
        size = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += size // tensor.dims[0] if tensor.name in gathered and tensor.dims and tensor.dims[0] else size
    return total


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20  # GiB
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "peft", "llama_cpp_python")
        },
    }


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def bench_dir(bundle: Path) -> Path:
    """Reports go next to the bundle (never inside it: that would fail `slmops verify`)."""
    return bundle.parent / f"{bundle.name}-bench"


def summarise(report: Report) -> tuple[dict, dict]:
    """The headline numbers per scenario: the bundle's base decode and prefill speed, and their ratios against
    each baseline (x_pytorch, x_llamacpp for decode; prefill_x_... for prefill); and the adapter overhead:
    the share of decode speed lost against the same base without LoRA inputs."""

    def row(engine, adapter, scenario, plain=False):
        rows = [
            r
            for r in report.rows
            if r.engine == engine
            and r.adapter == adapter
            and r.scenario == scenario
            and ("no LoRA" in r.variant) == plain
        ]
        return rows[0] if rows else None

    summary, overhead = {}, {}
    adapters = list(dict.fromkeys(r.adapter for r in report.rows if r.adapter != "base"))
    for s in dict.fromkeys(r.scenario for r in report.rows):
        ort = row("onnxruntime-genai", "base", s)
        if ort is None:
            continue
        entry = {
            "ort_decode_tps": ort.decode_tps,
            "ort_prefill_tps": ort.prefill_tps,
            "bound_fraction": ort.bound_fraction,
        }
        for key, engine in (("pytorch", "pytorch"), ("llamacpp", "llama.cpp")):
            other = row(engine, "base", s)
            if other and other.decode_tps:
                entry[f"x_{key}"] = ort.decode_tps / other.decode_tps
            if other and other.prefill_tps and ort.prefill_tps:
                entry[f"prefill_x_{key}"] = ort.prefill_tps / other.prefill_tps
        plain = row("onnxruntime-genai", "base", s, plain=True)
        if plain:
            entry["no_lora_decode_tps"] = plain.decode_tps
            measured = {name: row("onnxruntime-genai", name, s) for name in adapters}
            measured["base (empty LoRA inputs)"] = ort
            overhead[s] = {name: 1 - r.decode_tps / plain.decode_tps for name, r in measured.items() if r}
        summary[s] = entry
    return summary, overhead
