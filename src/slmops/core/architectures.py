"""The model architectures slmops takes from fine-tuning to a bundle, and the modules a LoRA may train on each.

Written once: `finetune` refuses anything else before training starts (export could not take the
adapter), and export reads the packed groups from here. Each architecture below is proved through the
whole path by tests/test_architectures.py (the README's architecture table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmops.core.errors import RunError

# The linear projections of a decoder layer as onnxruntime-genai's builder names them in its graph.
UNPACKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections some families keep in one Linear (Phi-3: qkv_proj, gate_up_proj). The builder splits such a
# LoRA into its members' MatMuls (A shared, B cut by output rows): group -> members in output order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Architecture:
    name: str  # transformers' architecture class, which the model builder dispatches on
    model_type: str
    examples: str  # the models users bring with it
    modules: tuple[str, ...]  # its linear modules, the LoRA targets export takes


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama", "SmolLM2, TinyLlama, Llama 3.x", UNPACKED),
        Architecture("MistralForCausalLM", "mistral", "Mistral 7B", UNPACKED),
        Architecture("Qwen2ForCausalLM", "qwen2", "Qwen2.5 (q/k/v biases)", UNPACKED),
        Architecture("Qwen3ForCausalLM", "qwen3", "Qwen3 (q/k norms)", UNPACKED),
        Architecture(
            "Phi3ForCausalLM", "phi3", "Phi-3.5-mini, Phi-4-mini", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        ),
        Architecture("Gemma2ForCausalLM", "gemma2", "Gemma 2 (sliding window, soft-capping)", UNPACKED),
    )
}


def supported() -> str:
    return ", ".join(a.model_type for a in ARCHITECTURES.values())


def architecture_name(model_path: Path) -> str:
    """transformers' class for the model (from config.json; by model_type where a folder omits it)."""
    return _name(_config(model_path))


def architecture_of(model_path: Path) -> Architecture:
    """The model's architecture, or a one-line refusal naming the ones slmops exports."""
    config = _config(model_path)
    name = _name(config)
    if name not in ARCHITECTURES:
        raise RunError(
            f"model architecture {name} ({config.get('model_type', '?')}) is not one slmops can export with "
            f"adapters; supported: {supported()}"
        )
    return ARCHITECTURES[name]


def _config(model_path: Path) -> dict:
    return json.loads((Path(model_path) / "config.json").read_text())


def _name(config: dict) -> str:
    by_type = {a.model_type: a.name for a in ARCHITECTURES.values()}
    return (config.get("architectures") or [by_type.get(config.get("model_type", ""), "?")])[0]


def check_targets(model_path: Path, target_modules: list[str]) -> Architecture:
    """Refuse, before any training, LoRA targets that export could not turn into an adapter for this model."""
    arch = architecture_of(model_path)
    bad = [m for m in target_modules if m not in arch.modules]
    if bad:
        raise RunError(
            f"lora.target_modules {', '.join(bad)} is not a linear module of {arch.model_type} that export "
            f"takes; choose from {', '.join(arch.modules)}"
        )
    return arch
