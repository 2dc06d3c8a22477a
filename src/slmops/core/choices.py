"""Every list of choices, written once as a Literal: the recipe schema uses the Literals, the CLI their values.

Targets, precisions, int4 methods, block sizes and KV-cache types; and, for each target, the
execution provider that runs it (ONNX Runtime's name and onnxruntime-genai's).
"""

from __future__ import annotations

from typing import Literal, get_args

Target = Literal["cpu", "cuda", "dml", "webgpu", "qnn", "openvino", "vitisai"]
TARGET_CHOICES: tuple[str, ...] = get_args(Target)

Precision = Literal["int4", "int8", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
AUTO = "auto"  # export: build candidates, keep the fastest that meets --min-agreement (measuring.precision_search)
PrecisionChoice = Literal[Precision, Literal["auto"]]
PRECISION_CHOICES: tuple[str, ...] = (*PRECISIONS, AUTO)
DEFAULT_MIN_AGREEMENT = 0.9

# int4 methods: the model builder's, and "gguf", which keeps the blocks of a GGUF-quantized source exactly
# (slmops' GgufBlocks pass). "auto" resolves per model: gguf where its weights are on a GGUF grid.
BuilderInt4Algo = Literal["default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last"]
BUILDER_INT4_ALGOS: tuple[str, ...] = get_args(BuilderInt4Algo)
Int4Algo = Literal["auto", "gguf", BuilderInt4Algo]
INT4_ALGOS: tuple[str, ...] = ("auto", "gguf", *BUILDER_INT4_ALGOS)
FALLBACK_INT4_ALGO = "k_quant_mixed"  # for sources on no GGUF grid: the builder's most faithful method (README)

BlockSize = Literal[16, 32, 64, 128, 256]
BLOCK_SIZES: tuple[int, ...] = get_args(BlockSize)
AccuracyLevel = Literal[0, 1, 2, 3, 4]

KvCache = Literal["fp32", "int8"]  # the KV cache's element type
KV_CACHES: tuple[str, ...] = get_args(KvCache)

# Execution providers by target: ONNX Runtime's name, and onnxruntime-genai's name for append_provider.
PROVIDERS: dict[str, tuple[str, str | None]] = {
    "cpu": ("CPUExecutionProvider", None),
    "cuda": ("CUDAExecutionProvider", "cuda"),
    "dml": ("DmlExecutionProvider", "dml"),
    "webgpu": ("WebGpuExecutionProvider", "WebGPU"),
    "qnn": ("QNNExecutionProvider", "QNN"),
    "openvino": ("OpenVINOExecutionProvider", "OpenVINO"),
    "vitisai": ("VitisAIExecutionProvider", "VitisAI"),
}


def available_targets() -> list[str]:
    """Targets whose execution provider this machine's ONNX Runtime really has.

    onnxruntime-genai's own is_*_available() answer True for QNN, OpenVINO and WebGPU on a plain
    CPU build, so they cannot tell; ONNX Runtime's provider list can (CUDA also needs a device).
    """
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    found = [name for name, (provider, _) in PROVIDERS.items() if provider in have]
    if "cuda" in found:
        import onnxruntime_genai as og

        found = [n for n in found if n != "cuda" or og.is_cuda_available()]
    return found


Tracker = Literal["tensorboard", "wandb", "mlflow"]  # training.report_to / --report-to
TRACKERS: tuple[str, ...] = get_args(Tracker)
LrScheduler = Literal["constant", "linear", "cosine", "constant_with_warmup"]

TrainOn = Literal["all_assistant", "last_assistant"]  # data.train_on: which assistant turns SFT learns
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
