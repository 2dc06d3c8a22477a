"""The quantized KV cache: per-layer scales calibrated from the model itself, base and adapters.

onnxruntime-genai's builder (0.18) stores the KV cache in int8 on CPU given one scale per layer for
K and for V (`kv_cache_quant_scheme` int8_per_tensor, `kv_cache_scale_file`). The cache holds K
after the rotary embedding, as the PyTorch cache does, so the scales come from the past_key_values
of a PyTorch forward over calibration texts: the largest |K| and |V| of each layer, over the base
and every adapter (an adapter on k/v moves them), times a margin, over the int8 range.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from slmops.core.errors import RunError

SCHEME = "int8_per_tensor"  # the builder's name for one int8 scale per layer and side
QMAX = 128  # int8: a scale is threshold / 128 (the builder rescales by the file's qmax)
MARGIN = 1.2  # headroom over the calibrated maximum for texts unlike the calibration set
SCALE_FILE = "kv_cache_scales.json"


def calibration_texts() -> list[str]:
    """Texts for the scales, apart from the parity texts so that `verify --parity` stays held out."""
    return json.loads(
        resources.files("slmops.shipping").joinpath("kv_calibration_texts.json").read_text(encoding="utf-8")
    )


def calibrate(
    model_path: Path, adapter_paths: dict[str, Path], texts: list[str] | None = None, max_tokens: int = 512
) -> dict:
    """The scale file the builder reads: {"scales": {"k_scales", "v_scales"}, "qmax"}, plus provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = texts or calibration_texts()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    batches = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens] for t in texts]
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    k_max = torch.zeros(model.config.num_hidden_layers)
    v_max = torch.zeros(model.config.num_hidden_layers)

    def observe(m) -> None:
        with torch.no_grad():
            for ids in batches:
                layers = getattr(m(input_ids=ids, use_cache=True).past_key_values, "layers", None)
                if not layers or len(layers) != len(k_max) or not hasattr(layers[0], "keys"):
                    raise RunError(
                        f"{model.config.model_type} keeps its KV cache in a layout slmops cannot calibrate "
                        "(one K/V pair per layer); export it with --kv-cache fp32"
                    )
                for i, layer in enumerate(layers):
                    k_max[i] = max(k_max[i], layer.keys.abs().max())
                    v_max[i] = max(v_max[i], layer.values.abs().max())

    observe(model)
    if adapter_paths:
        from slmops.core.models import with_adapters

        peft = with_adapters(model, adapter_paths)
        for name in adapter_paths:
            peft.set_adapter(name)
            observe(peft)
    scale = lambda peaks: [max(float(p), 1e-6) * MARGIN / QMAX for p in peaks]  # noqa: E731 - a zero layer stays valid
    return {
        "scales": {"k_scales": scale(k_max), "v_scales": scale(v_max)},
        "qmax": QMAX,
        "calibration": {
            "scheme": SCHEME,
            "margin": MARGIN,
            "texts": len(batches),
            "max_tokens": max_tokens,
            "models": ["base", *adapter_paths],
        },
    }


def builder_options(scale_file: Path) -> dict:
    """The builder's extra options for the int8 cache."""
    return {"kv_cache_quant_scheme": SCHEME, "kv_cache_scale_file": str(scale_file)}
