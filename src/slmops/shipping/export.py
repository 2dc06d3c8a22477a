"""Export: one ONNX Runtime GenAI base model for N LoRA adapters, built by Olive, packed as a bundle.

The route (see ../shared/PITFALLS.md): Olive's ModelBuilder pass builds the base from the HF model
plus a zero LoRA covering every module any adapter trains, with the LoRA MatMuls excluded from
quantization (floats, so adapters stay swappable); slmops' FuseLoRA pass packs each layer's q/k/v
(and gate/up) with their LoRA into one base MatMul and one LoRA pair; ExtractAdapters turns the LoRA
weights into graph inputs of dynamic rank. Each adapter is then written as its own `.onnx_adapter` whose tensor
names are the graph's inputs, zero-padded over modules it does not train.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from slmops.core.architectures import Architecture, architecture_of
from slmops.core.choices import FALLBACK_INT4_ALGO
from slmops.core.compat import BUILDER_OPTIONS
from slmops.core.errors import RunError
from slmops.core.files import atomic_dir, output_lock, write_file, write_text
from slmops.core.models import ResolvedModel, model_fingerprint, resolve_model
from slmops.core.workflows import run_workflow, validate_with_olive, workflow
from slmops.shipping import adapters as lora
from slmops.shipping import bundle as bundle_mod
from slmops.shipping import kv_cache
from slmops.shipping.gguf_grid import GGUF_BLOCK_SIZES
from slmops.shipping.manifest import AdapterRecord, BundleManifest, read_manifest

if TYPE_CHECKING:
    from slmops.training.recipe import ExportSection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # Olive accelerator device
    provider: str  # ONNX Runtime execution provider
    precisions: tuple[str, ...]
    adapters: bool = True  # can the runtime switch LoRA adapters on this EP?
    static_shapes: bool = False  # NPUs compile fixed shapes
    why_no_adapters: str = ""
    quantized_kv_cache: bool = False  # does onnxruntime-genai's builder quantize the KV cache here?
    default_kv_cache: str = "fp32"  # what `slmops bench` measured best here (README, speed table)


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", "cpu", "CPUExecutionProvider", ("int4", "int8", "fp32"), quantized_kv_cache=True),
        Target("cuda", "gpu", "CUDAExecutionProvider", ("int4", "fp16", "fp32"), quantized_kv_cache=True),
        Target("webgpu", "gpu", "WebGpuExecutionProvider", ("int4", "fp16", "fp32")),
        Target(
            "dml",
            "gpu",
            "DmlExecutionProvider",
            ("int4", "fp16"),
            adapters=False,
            why_no_adapters="onnxruntime-genai cannot load LoRA adapters on DirectML",
        ),
        Target(
            "qnn",
            "npu",
            "QNNExecutionProvider",
            ("int4",),
            adapters=False,
            static_shapes=True,
            why_no_adapters="the QNN NPU runs static-shape graphs, so the LoRA rank cannot vary at run time",
        ),
        Target(
            "openvino",
            "npu",
            "OpenVINOExecutionProvider",
            ("int4", "int8", "fp16"),
            adapters=False,
            static_shapes=True,
            why_no_adapters="the OpenVINO NPU compiles static-shape graphs",
        ),
        Target(
            "vitisai",
            "npu",
            "VitisAIExecutionProvider",
            ("int4",),
            adapters=False,
            static_shapes=True,
            why_no_adapters="the VitisAI NPU compiles static-shape graphs",
        ),
    )
}


def target_limits(target: Target) -> list[str]:
    """What the stack cannot do on this target, said before a build starts (and in --dry-run)."""
    limits = []
    if not target.adapters:
        limits.append(
            f"no run-time adapters ({target.why_no_adapters}): each adapter becomes a merged model "
            "(--merge NAME), the route that works here"
        )
    if target.static_shapes:
        limits.append("static shapes: batch 1, context 64 (Olive's StaticLLM pass), fixed when the NPU compiles")
    if target.name in ("qnn", "vitisai", "openvino"):
        limits.append(
            "no calibration-based quantization (GPTQ/AWQ/QDQ): with separate adapters Olive's "
            "calibrated passes refuse the model; the builder's weight-only int4 is used"
        )
    if target.device != "cpu":
        limits.append(
            f"runs only where onnxruntime-genai has {target.provider}; this machine builds the model but "
            "`slmops generate` / `bench` need that hardware"
        )
    return limits


@dataclass(frozen=True)
class Quantization:
    precision: str = "int4"
    int4_algo: str = "auto"
    block_size: int = 32
    accuracy_level: int = 4
    kv_cache: str = "fp32"  # one of core.choices.KV_CACHES
    float_layers: tuple[int, ...] = ()  # gguf: decoder layers whose MatMuls stay fp32 (the most sensitive)

    def describe(self) -> str:
        cache = f", {self.kv_cache} KV cache" if self.kv_cache != "fp32" else ""
        if self.precision == "int4":
            floats = f", layers {','.join(map(str, self.float_layers))} fp32" if self.float_layers else ""
            return (
                f"int4 {self.int4_algo}, block {self.block_size}, accuracy level {self.accuracy_level}{floats}{cache}"
            )
        return self.precision + (f" k_quant, block {self.block_size}" if self.precision == "int8" else "") + cache


@dataclass
class ExportRequest:
    model: ResolvedModel
    adapters: dict[str, Path]  # name -> adapter folder or finetune output folder
    target: Target
    quant: Quantization = field(default_factory=Quantization)
    lora_modules: Optional[list[str]] = None  # graph LoRA inputs; default: the union of the adapters'
    merge: list[str] = field(default_factory=list)  # adapters that also get a merged model
    hf_merged: bool = False  # also write merged HF folders (for transformers users)


@dataclass
class ExportResult:
    bundle: str
    dry_run: bool
    target: str
    quantization: str
    adapters: dict[str, dict] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    olive_configs: list[str] = field(default_factory=list)
    seconds: Optional[float] = None
    kv_cache: dict = field(default_factory=lambda: {"dtype": "fp32"})  # and, when quantized, its calibration
    precision_search: Optional[dict] = (
        None  # --precision auto: every candidate measured (slmops.measuring.precision_search)
    )


def export_request(
    model: str,
    adapters: dict[str, Path],
    settings: Optional[ExportSection] = None,
    *,
    target: Optional[str] = None,
    precision: Optional[str] = None,
    int4_algo: Optional[str] = None,
    block_size: Optional[int | str] = None,
    accuracy_level: Optional[int] = None,
    kv_cache: Optional[str] = None,
    float_layers: Optional[tuple[int, ...]] = None,
    lora_modules: Optional[list[str]] = None,
    merge: tuple[str, ...] | list[str] = (),
    hf_merged: bool = False,
) -> ExportRequest:
    """What to build: a recipe's `export:` section (or the defaults) with the command line's flags over it
    (None: the flag was not given)."""
    from slmops.training.recipe import ExportSection

    s = settings or ExportSection()
    chosen = TARGETS[target or s.target]
    quant = Quantization(
        precision or s.precision,
        int4_algo or s.int4_algo,
        int(block_size or s.block_size),
        s.accuracy_level if accuracy_level is None else accuracy_level,
        kv_cache or s.kv_cache or chosen.default_kv_cache,
        float_layers if float_layers is not None else tuple(s.float_layers),
    )
    return ExportRequest(
        resolve_model(model), adapters, chosen, quant, lora_modules or s.lora_modules, list(merge), hf_merged
    )


def export_in_child(req: ExportRequest, output: Path) -> ExportResult:
    """export() in a fresh process (`python -m slmops.shipping.export JOB`), so Olive and torch stay out of a
    measuring process. Its SlmopsError comes back as a RunError; its output is shown with --verbose only."""
    import pickle
    import subprocess
    import sys
    import tempfile

    from slmops.core.workflows import verbose

    with tempfile.TemporaryDirectory(prefix="slmops-export-") as folder:
        job = Path(folder) / "job.pickle"
        job.write_bytes(pickle.dumps((req, Path(output).absolute(), verbose())))
        shown = sys.stderr if verbose() else subprocess.DEVNULL
        done = subprocess.run(
            [sys.executable, "-m", "slmops.shipping.export", str(job)],
            stdout=shown,
            stderr=shown if verbose() else subprocess.PIPE,
            text=True,
        )
        outcome = pickle.loads(job.read_bytes())
    if isinstance(outcome, ExportResult):
        return outcome
    last = (done.stderr or "").strip().splitlines()[-1:] if outcome is None else [outcome]
    raise RunError(last[0] if last else f"the export process exited {done.returncode}")


def _export_job(job: Path) -> None:
    """The child of export_in_child: run the pickled request, pickle back the result or the error's line."""
    import logging
    import os
    import pickle

    from slmops.core.errors import SlmopsError
    from slmops.core.privacy import go_offline

    req, output, show = pickle.loads(job.read_bytes())
    job.write_bytes(pickle.dumps(None))  # a crash leaves None: the parent reports the last line of stderr
    if show:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("slmops").setLevel(logging.INFO)  # Olive's log follows it (workflows.verbose)
    go_offline(allow_hub=os.environ.get("HF_HUB_OFFLINE") != "1")  # as the parent decided; Olive's telemetry off
    outcome: ExportResult | str
    try:
        outcome = export(req, output)
    except SlmopsError as exc:
        outcome = str(exc)
    job.write_bytes(pickle.dumps(outcome))


# ---------------------------------------------------------------------------------------------
# Olive config (pure)


def render_export(
    model_path: str,
    target: Target,
    quant: Quantization,
    adapter_path: Optional[str] = None,
    lora_nodes: tuple[str, ...] = (),
    work_dir: str = ".",
    kv_scales: Optional[str] = None,
) -> dict:
    """The Olive workflow that builds the base (with LoRA inputs when adapter_path is given). Pure.

    kv_scales: the calibrated scale file, for an int8 KV cache."""
    gguf = quant.precision == "int4" and quant.int4_algo == "gguf"
    builder: dict[str, Any] = {
        "type": "SlmopsModelBuilder",
        "precision": "fp32" if quant.precision == "int8" or gguf else quant.precision,
    }
    options: dict[str, Any] = {} if target.static_shapes else {"prune_lm_head": True}  # StaticLLM wants every logit
    options.update(BUILDER_OPTIONS)  # sliding-window caches at full length (core.compat)
    if quant.kv_cache == "int8":
        options.update(kv_cache.builder_options(Path(kv_scales or kv_cache.SCALE_FILE)))
    # prune_lm_head: prefill computes the last position's logits only, as llama.cpp does: measured +16-19%
    # prefill at 1024-4096 tokens, and no [tokens x vocab] logits tensor (800 MB at 4096 tokens on SmolLM2)
    builder["extra_options"] = options
    if quant.precision == "int4" and not gguf:
        builder.update(
            int4_algo_config=quant.int4_algo, int4_block_size=quant.block_size, int4_accuracy_level=quant.accuracy_level
        )
        if lora_nodes:
            builder["int4_nodes_to_exclude"] = list(lora_nodes)  # LoRA stays float, so adapters stay swappable
    passes = {"builder": builder}
    # Weights beside the graph, as the builder writes them: ORT maps them instead of holding the
    # protobuf and a copy (-200 MB RSS on SmolLM2), and graphs over 2 GB can be saved at all.
    external = {"save_as_external_data": True}
    if quant.precision == "int8":
        # The builder has no int8: Olive's 8-bit k-quant on the fp32 graph. (Its block-wise RTN pass
        # renames the graph output `logits` to `logits_Q8`, which onnxruntime-genai cannot run.)
        passes["int8"] = {
            "type": "OnnxKQuantQuantization",
            "bits": 8,
            "block_size": quant.block_size,
            "accuracy_level": quant.accuracy_level,
            "nodes_to_exclude": list(lora_nodes),
            **external,
        }
    if adapter_path:
        # One base MatMul and one LoRA pair per q/k/v (gate/up) group: fewer tiny decode kernels.
        passes["fuse_lora"] = {"type": "FuseLoRA", **external}
    if gguf:  # after FuseLoRA, which packs fp32 MatMuls; the LoRA MatMuls stay float
        passes["gguf"] = {
            "type": "GgufBlocks",
            "block_size": quant.block_size,
            "accuracy_level": quant.accuracy_level,
            "float_layers": list(quant.float_layers),
            **external,
        }
    if adapter_path:
        passes["adapters"] = {
            "type": "ExtractAdapters",
            "make_inputs": True,
            "dynamic_lora_r": True,
            "save_format": "onnx_adapter",
            **external,
        }
    if target.static_shapes:
        passes["static"] = {"type": "StaticLLM", "batch_size": 1, "context_length": 64}
    input_model = {"type": "HfModel", "model_path": model_path, "task": "text-generation"}
    if adapter_path:
        input_model["adapter_path"] = adapter_path
    system = {
        "type": "LocalSystem",
        "accelerators": [{"device": target.device, "execution_providers": [target.provider]}],
    }
    return workflow(input_model, passes, work_dir, system=system)


def lora_nodes(modules: set[str], n_layers: int) -> tuple[str, ...]:
    return tuple(
        lora.graph_node(layer, module, ab) for layer in range(n_layers) for module in sorted(modules) for ab in "AB"
    )


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class Checked:
    adapters: list[lora.Adapter]
    n_layers: int
    shapes: dict[tuple[int, str], tuple[int, int]]


def check_request(req: ExportRequest) -> Checked:
    """Everything that can be refused before building: target limits, adapters that do not fit."""
    t, q = req.target, req.quant
    if q.precision not in t.precisions:
        raise RunError(f"target {t.name} does not take precision {q.precision}; use one of {', '.join(t.precisions)}")
    if q.kv_cache != "fp32" and not t.quantized_kv_cache:
        raise RunError(
            f"target {t.name} cannot keep the KV cache in {q.kv_cache} (onnxruntime-genai quantizes it on "
            "cpu and cuda only); use --kv-cache fp32"
        )
    adapters = [lora.load_adapter(name, path) for name, path in req.adapters.items()]
    unknown = [name for name in req.merge if name not in req.adapters]
    if unknown:
        raise RunError(
            f"--merge names {', '.join(unknown)}, which is not among the adapters "
            f"({', '.join(req.adapters) or 'none'}); pass it with --adapter NAME=PATH too"
        )
    if adapters and not t.adapters and set(req.merge) != set(req.adapters):
        raise RunError(
            f"target {t.name} cannot switch adapters at run time ({t.why_no_adapters}); "
            f"export one merged model per adapter with --merge {' --merge '.join(req.adapters)}"
        )
    if req.hf_merged and not req.merge:
        raise RunError("--hf-merged writes the HF weights of merged variants: add --merge NAME")
    if req.lora_modules and not t.adapters:
        raise RunError(f"--lora-modules needs adapters at run time, which target {t.name} cannot switch")
    n_layers, shapes = lora.base_shapes(req.model.path)
    _check_int4_algo(req, n_layers)
    fingerprint = model_fingerprint(req.model.path)
    for adapter in adapters:
        _check_base(adapter, req.model, fingerprint)
        lora.check_fits(adapter, n_layers, shapes, req.model.name)
    if (adapters and t.adapters) or req.lora_modules:  # run-time adapters: only where the whole path is proved
        _check_lora_modules(req, architecture_of(req.model.path))
    return Checked(adapters, n_layers, shapes)


def _check_lora_modules(req: ExportRequest, arch: Architecture) -> None:
    bad = sorted(set(req.lora_modules or ()) - set(arch.modules))
    if bad:
        raise RunError(
            f"--lora-modules {', '.join(bad)} is not a linear layer the exporter handles; "
            f"choose from {', '.join(arch.modules)}"
        )


GGUF_TARGETS = ("cpu", "cuda")  # where MatMulNBits takes zero points and the block-sum MatMul runs as measured


def resolve_quantization(quant: Quantization, model_path: Path, target: Target) -> Quantization:
    """int4 "auto": the source's own GGUF blocks where its weights are on such a grid (exact, README
    precision table), else the builder's k_quant_mixed."""
    from slmops.shipping.gguf_grid import on_grid

    if quant.precision == "int4" and quant.int4_algo == "auto":
        gguf = target.name in GGUF_TARGETS and quant.block_size in GGUF_BLOCK_SIZES and on_grid(model_path)
        quant = replace(quant, int4_algo="gguf" if gguf else FALLBACK_INT4_ALGO)
    return quant


def _check_int4_algo(req: ExportRequest, n_layers: int) -> None:
    from slmops.shipping.gguf_grid import on_grid

    q = req.quant
    if q.float_layers and not (q.precision == "int4" and q.int4_algo == "gguf"):
        raise RunError("--float-layers applies to --int4-algo gguf only; drop it or choose gguf")
    if q.precision != "int4" or q.int4_algo != "gguf":
        return
    if req.target.name not in GGUF_TARGETS:
        raise RunError(
            f"--int4-algo gguf builds for {', '.join(GGUF_TARGETS)}, not {req.target.name}; "
            f"use --int4-algo {FALLBACK_INT4_ALGO}"
        )
    if q.block_size not in GGUF_BLOCK_SIZES:
        raise RunError(
            f"--int4-algo gguf keeps blocks of 32, which block size {q.block_size} cannot hold; "
            f"use --block-size {' or '.join(map(str, GGUF_BLOCK_SIZES))}"
        )
    if not on_grid(req.model.path):
        raise RunError(
            f"--int4-algo gguf needs weights dequantized from a GGUF (Q4_0/Q4_1 blocks of 32), and "
            f"{req.model.name}'s are not; use --int4-algo {FALLBACK_INT4_ALGO}"
        )
    bad = [layer for layer in q.float_layers if not 0 <= layer < n_layers]
    if bad:
        raise RunError(f"--float-layers {', '.join(map(str, bad))}: {req.model.name} has layers 0-{n_layers - 1}")


def _check_base(adapter: lora.Adapter, model: ResolvedModel, fingerprint: str) -> None:
    """An adapter from `slmops finetune` records its base's fingerprint: a different base is refused."""
    recorded = ((adapter.run or {}).get("model") or {}).get("sha256")
    if recorded and recorded != fingerprint:
        trained_on = ((adapter.run or {}).get("model") or {}).get("name", "another model")
        raise RunError(
            f"adapter '{adapter.name}' was trained on {trained_on} (weights sha256 {recorded[:12]}), "
            f"not on {model.name} ({fingerprint[:12]}); export it with --model {trained_on}"
        )


def graph_modules(req: ExportRequest, adapters: list[lora.Adapter], shapes: dict) -> set[str]:
    """The projections that get LoRA inputs: what the adapters train (or --lora-modules), packed groups whole."""
    modules = set().union(*(a.graph_modules for a in adapters)) if adapters else set()
    if req.lora_modules:
        wanted = {part for module in req.lora_modules for part in lora.members(module)}
        missing = modules - wanted
        if missing:
            raise RunError(
                f"--lora-modules leaves out {', '.join(sorted(missing))}, which adapters train; "
                "add them, or drop --lora-modules"
            )
        modules = wanted
    return lora.graph_modules(modules, shapes)


def export(req: ExportRequest, output: Path, dry_run: bool = False, progress=None) -> ExportResult:
    """Build the bundle at `output` (atomically), or with dry_run write and validate the Olive configs only."""
    import time

    start = time.monotonic()
    req = replace(req, quant=resolve_quantization(req.quant, req.model.path, req.target))
    checked = check_request(req)
    for limit in target_limits(req.target):  # after the refusals, so a refused request stays one line
        _say(progress, f"note: target {req.target.name}: {limit}")
    adapters, n_layers, shapes = checked.adapters, checked.n_layers, checked.shapes
    run_time = adapters if req.target.adapters else []  # the rest are only merged
    modules = graph_modules(req, run_time, shapes) if req.target.adapters else set()
    result = ExportResult(str(output), dry_run, req.target.name, req.quant.describe())
    with atomic_dir(output) as tmp:
        work = tmp / ".work"
        union = str(work / "lora-union") if modules else None
        scales = str(tmp / kv_cache.SCALE_FILE) if req.quant.kv_cache != "fp32" else None
        config = render_export(
            str(req.model.path), req.target, req.quant, union, lora_nodes(modules, n_layers), str(work / "base"), scales
        )
        merged_configs = {
            name: render_export(
                str(work / "merged-hf" / name),
                req.target,
                req.quant,
                work_dir=str(work / f"merged-{name}"),
                kv_scales=scales,
            )
            for name in req.merge
        }
        for cfg in (config, *merged_configs.values()):
            validate_with_olive(cfg, device=req.target.device, provider=req.target.provider)
        _write_json(tmp / "olive_config.json", config)
        for name, cfg in merged_configs.items():
            _write_json(tmp / "merged" / name / "olive_config.json", cfg)
        result.olive_configs = ["olive_config.json", *(f"merged/{n}/olive_config.json" for n in merged_configs)]
        if dry_run:
            shutil.rmtree(work, ignore_errors=True)
            return result
        if scales:
            _say(progress, f"calibrating the {req.quant.kv_cache} KV cache on the base and {len(adapters)} adapter(s)")
            calibration = kv_cache.calibrate(req.model.path, {a.name: a.path for a in adapters})
            write_text(Path(scales), json.dumps(calibration, indent=2) + "\n")
            result.kv_cache = {
                "dtype": req.quant.kv_cache,
                "scheme": kv_cache.SCHEME,
                "scales": kv_cache.SCALE_FILE,
                **calibration["calibration"],
            }
        _say(progress, f"building the {req.quant.precision} base for {req.target.name}")
        if union:
            lora.union_adapter(run_time, modules, n_layers, shapes, Path(union), str(req.model.path))
        _copy_model(_run_olive(config), tmp)
        inputs = graph_lora_inputs(tmp / "model.onnx") if run_time else {}
        for adapter in run_time:
            _say(progress, f"adapter {adapter.name}")
            write_onnx_adapter(adapter, inputs, shapes, tmp / "adapters" / f"{adapter.name}.onnx_adapter")
            result.adapters[adapter.name] = adapter_record(adapter)
        for name, cfg in merged_configs.items():
            _say(progress, f"merged model for {name}")
            _build_merged(req, next(a for a in adapters if a.name == name), cfg, tmp)
            result.merged.append(name)
        shutil.rmtree(work, ignore_errors=True)
        result.seconds = round(time.monotonic() - start, 1)
        manifest = bundle_mod.new_manifest(req, adapters, modules, n_layers, result)
        bundle_mod.write_bundle_metadata(tmp, manifest)
    return result


def _build_merged(req: ExportRequest, adapter: lora.Adapter, config: dict, bundle: Path) -> None:
    """merged/NAME/: the base with the adapter merged in PyTorch, then built like the base (hf/NAME/ too)."""
    hf = Path(config["input_model"]["model_path"])
    merge_to_hf(req.model.path, adapter, hf)
    _copy_model(_run_olive(config), bundle / "merged" / adapter.name)
    if req.hf_merged:
        shutil.copytree(hf, bundle / "hf" / adapter.name)


def _say(progress, message: str) -> None:
    if progress:
        progress(message)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _run_olive(config: dict) -> Path:
    """Run the workflow; return the folder that holds the built model.onnx."""
    run_workflow(config, Path(config["output_dir"]).parent / "cwd", "Olive's build failed")
    found = sorted(Path(config["output_dir"]).rglob("genai_config.json"))
    if not found:
        raise RunError("Olive finished without building a model; rerun with --verbose to see Olive's log")
    return found[0].parent


# Olive's bookkeeping and the zero LoRA's own adapter file are not part of a bundle.
_SKIP = {
    "adapter_weights.onnx_adapter",
    "footprint.json",
    "output_footprint.json",
    "run_history.txt",
    "model_config.json",
}


def _copy_model(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name not in _SKIP and item.is_file():
            shutil.copy2(item, dest / item.name)
            (dest / item.name).chmod(0o644)  # Olive writes external data owner-only


def graph_lora_inputs(model_file: Path) -> dict[str, tuple[int, int]]:
    """Every LoRA input of the graph -> its fixed size: (in, 0) for lora_A [in, r], (0, out) for lora_B [r, out]."""
    import onnx

    return lora.lora_inputs(onnx.load(str(model_file), load_external_data=False).graph)


def write_onnx_adapter(
    adapter: lora.Adapter,
    inputs: dict[str, tuple[int, int]],
    shapes: dict[tuple[int, str], tuple[int, int]],
    path: Path,
) -> None:
    import onnxruntime as ort

    tensors = lora.onnx_tensors(adapter, inputs, shapes)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()})
    write_file(path, lambda tmp: fmt.export_adapter(str(tmp)))


def adapter_record(adapter: lora.Adapter) -> dict:
    """What the manifest says about an adapter: shape, and the provenance its finetune run recorded."""
    run = adapter.run or {}
    record = {
        "file": f"adapters/{adapter.name}.onnx_adapter",
        "source": str(adapter.path),
        "rank": adapter.rank,
        "alpha": adapter.config.get("lora_alpha"),
        "modules": sorted(adapter.modules),
        "layers": len(adapter.layers),
    }
    if run:
        record.update(
            recipe=run.get("recipe"),
            method=run.get("method"),
            stages=list(run.get("stages") or {}),
            data={
                k: {"sha256": v.get("sha256"), "dataset": v.get("dataset"), "file": v.get("file")}
                for k, v in (run.get("data") or {}).items()
                if isinstance(v, dict)
            },
            metrics=_metrics(run),
        )
    return record


def _metrics(run: dict) -> dict:
    out = {}
    for stage, summary in (run.get("stages") or {}).items():
        out[stage] = {
            k: summary.get(k)
            for k in ("steps", "final_loss", "eval_loss_start", "eval_loss")
            if summary.get(k) is not None
        }
        out[stage].update(
            {f"eval_{k}": v for k, v in (summary.get("eval_metrics") or {}).items() if k.startswith("rewards/")}
        )
    return out


def merge_to_hf(model_path: Path, adapter: lora.Adapter, out: Path) -> Path:
    """The base with the adapter merged in, saved as an HF folder (fp32 weights and the tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Adding adapters to an existing bundle


def add_adapters(bundle_dir: Path, adapters: dict[str, Path], model: ResolvedModel, progress=None) -> BundleManifest:
    """Write new adapters into a bundle without rebuilding the base; the manifest is replaced atomically."""
    with output_lock(bundle_dir):  # two --into runs would each write a manifest missing the other's adapter
        return _add_adapters(bundle_dir, adapters, model, progress)


def _check_kv_range(
    bundle_dir: Path, manifest: BundleManifest, model: ResolvedModel, adapters: list[lora.Adapter]
) -> None:
    """A quantized KV cache's scales are fixed in the graph: an adapter whose K or V run past them would clip."""
    if manifest.kv_cache.dtype == "fp32" or not manifest.kv_cache.scales:
        return
    fixed = json.loads((bundle_dir / manifest.kv_cache.scales).read_text())["scales"]
    for adapter in adapters:
        needed = kv_cache.calibrate(model.path, {adapter.name: adapter.path})["scales"]
        # both carry the margin: a peak clips once it passes the old peak x margin, i.e. scale x 127
        over = [
            (side, layer, need / (have * kv_cache.MARGIN * 127 / kv_cache.QMAX))
            for side in ("k_scales", "v_scales")
            for layer, (need, have) in enumerate(zip(needed[side], fixed[side]))
            if need > have * kv_cache.MARGIN * 127 / kv_cache.QMAX
        ]
        if over:
            side, layer, ratio = max(over, key=lambda o: o[2])
            raise RunError(
                f"adapter '{adapter.name}' drives layer {layer}'s {side[0].upper()} cache {ratio:.2f}x past the "
                f"bundle's int8 KV cache range; export a new bundle with it (or with --kv-cache fp32)"
            )


def _add_adapters(bundle_dir: Path, adapters: dict[str, Path], model: ResolvedModel, progress=None) -> BundleManifest:
    manifest = read_manifest(bundle_dir)
    if not manifest.target.adapters:
        raise RunError(
            f"bundle '{bundle_dir}' targets {manifest.target.name}, which cannot switch adapters; "
            "export a new bundle with --merge"
        )
    clash = sorted(set(adapters) & set(manifest.adapters))
    if clash:
        raise RunError(f"bundle '{bundle_dir}' already has adapter(s) {', '.join(clash)}; choose other names")
    fingerprint = model_fingerprint(model.path)
    if manifest.base.sha256 != fingerprint:
        raise RunError(
            f"--model {model.name} is not the base this bundle was built from "
            f"({manifest.base.name}); pass --model {manifest.base.name}"
        )
    loaded, inputs, shapes = _checked_adapters(bundle_dir, manifest, adapters, model, fingerprint)
    written = []
    try:
        for adapter in loaded:
            _say(progress, f"adapter {adapter.name}")
            path = bundle_dir / "adapters" / f"{adapter.name}.onnx_adapter"
            write_onnx_adapter(adapter, inputs, shapes, path)
            written.append(path)
            manifest.adapters[adapter.name] = AdapterRecord.model_validate(adapter_record(adapter))
        bundle_mod.write_bundle_metadata(bundle_dir, manifest)
    except BaseException:
        for path in written:  # the old manifest still holds: leave no file it does not list
            path.unlink(missing_ok=True)
        raise
    return manifest


def _checked_adapters(
    bundle_dir: Path, manifest: BundleManifest, adapters: dict[str, Path], model: ResolvedModel, fingerprint: str
) -> tuple[list[lora.Adapter], dict[str, tuple[int, int]], dict[tuple[int, str], tuple[int, int]]]:
    """Read PEFT adapters and refuse any that does not fit the bundle: its base, shapes, graph inputs, KV range."""
    n_layers, shapes = lora.base_shapes(model.path)
    inputs = graph_lora_inputs(bundle_dir / "model.onnx")
    loaded = [lora.load_adapter(name, path) for name, path in adapters.items()]
    for adapter in loaded:
        _check_base(adapter, model, fingerprint)
        lora.check_fits(adapter, n_layers, shapes, model.name)
        lora.onnx_tensors(adapter, inputs, shapes)  # refuses modules the graph has no input for, before writing
    _check_kv_range(bundle_dir, manifest, model, loaded)
    return loaded, inputs, shapes


def warm_live_adapters() -> None:
    """Import what converting a PEFT adapter needs (torch: over a second), so a server pays it at start, not on a POST."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401


def live_adapter(bundle_dir: Path, manifest: BundleManifest, name: str, path: Path) -> tuple[dict, str]:
    """An adapter for a running server: its tensors named after the bundle graph's LoRA inputs, and its sha256.

    A PEFT folder (or `slmops finetune` output) is converted here and checked as `export --into`
    checks one. An `.onnx_adapter` file is read as it is; if it sits in a bundle, that bundle must
    have the same base, and the file the sha256 that bundle's manifest records for it. Either way
    the server checks the tensors against its graph's inputs as it loads them.
    """
    from slmops.core.files import file_sha256
    from slmops.shipping.batching import read_onnx_adapter
    from slmops.shipping.manifest import MANIFEST

    if path.is_dir():
        base = manifest.base  # where it was built, else by name (the embedded default builds itself)
        model = resolve_model(base.path if base.source == "local" and Path(base.path).is_dir() else base.name)
        loaded, inputs, shapes = _checked_adapters(bundle_dir, manifest, {name: path}, model, manifest.base.sha256)
        return lora.onnx_tensors(loaded[0], inputs, shapes), file_sha256(loaded[0].path / "adapter_model.safetensors")
    if path.suffix != ".onnx_adapter" or not path.is_file():
        raise RunError(f"'{path}' is neither a PEFT adapter folder nor an .onnx_adapter file")
    digest = file_sha256(path)
    home = path.parent.parent
    if (home / MANIFEST).is_file():
        other = read_manifest(home)
        if other.base.sha256 != manifest.base.sha256:
            raise RunError(
                f"'{path}' belongs to a bundle built from {other.base.name} (weights sha256 "
                f"{other.base.sha256[:12]}), not this server's {manifest.base.name}; export it for this base"
            )
        recorded = other.files.get(path.relative_to(home).as_posix())
        if recorded is not None and recorded != digest:
            raise RunError(
                f"'{path}' does not match the sha256 its bundle's manifest records; run `slmops verify {home}`"
            )
    return read_onnx_adapter(path), digest


if __name__ == "__main__":  # export_in_child's child; run the module's own copy, whose classes pickle by name
    import sys

    from slmops.shipping import export as _module

    _module._export_job(Path(sys.argv[1]))
