"""Fidelity of a bundle against PyTorch + PEFT: teacher-forced logits of the base and of each adapter.

fp32 bundles: the largest absolute logit difference (must be <= 1e-3). Quantized bundles (weights or
KV cache): top-1 agreement with PyTorch fp32 at every position of held-out text; each adapter's
agreement must be within 5 points of the base's, so the adapter path adds no error of its own; with
fp32 weights and an int8 cache, every row must also agree at least 90% of the time.
After a prompt of at most 8 tokens, every text is computed from the KV cache, so a quantized cache is measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from slmops.bundle import BundleError

MAX_ABS_FP32 = 1e-3
MAX_AGREEMENT_DROP = 0.05
MIN_AGREEMENT_FP32_QUANTIZED_CACHE = 0.9  # fp32 weights with an int8 cache: the cache alone may not cost more


@dataclass
class Parity:
    name: str  # "base" or an adapter name
    positions: int
    agreement: float  # top-1 agreement with PyTorch fp32 over all positions
    max_abs_diff: float  # largest |logit difference| (meaningful for fp32 bundles)


@dataclass
class ParityReport:
    precision: str
    texts: int
    kv_cache: str = "fp32"  # the cache each text is read from after its prompt
    rows: list[Parity] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def held_out_texts() -> list[str]:
    """Text no shipped recipe trains on, written for this check (instructions, facts, dialogue, code)."""
    return json.loads(resources.files("slmops").joinpath("parity_texts.json").read_text(encoding="utf-8"))


def check_parity(bundle: Path, manifest: dict, model_path: Path, adapter_paths: dict[str, Path],
                 texts: Optional[list[str]] = None, max_tokens: int = 128) -> ParityReport:
    """Run base and adapters through the bundle (onnxruntime) and PyTorch, and judge the differences."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = texts or held_out_texts()
    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    sequences = [s for s in sequences if len(s) >= 2]
    session = _session(bundle / "model.onnx")
    head_size = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    torch_model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    precision = manifest["quantization"]["precision"]
    report = ParityReport(precision, len(sequences), (manifest.get("kv_cache") or {}).get("dtype", "fp32"))
    report.rows.append(_compare("base", session, None, torch_model, sequences, head_size))
    if adapter_paths:
        from slmops.models import with_adapters

        peft_model = with_adapters(torch_model, adapter_paths)
        for name in adapter_paths:
            peft_model.set_adapter(name)
            if name in manifest["adapters"]:
                lora = ort.LoraAdapter()
                lora.Load(str(bundle / manifest["adapters"][name]["file"]))
                report.rows.append(_compare(name, session, lora, peft_model, sequences, head_size))
            if name in (manifest.get("merged") or {}):  # the merged variant must match the same PEFT model
                merged = _session(bundle / manifest["merged"][name]["folder"] / "model.onnx")
                report.rows.append(_compare(f"merged:{name}", merged, None, peft_model, sequences, head_size))
    _judge(report)
    return report


def _session(model_file: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _compare(name: str, session, lora, torch_model, sequences: list[list[int]], head_size: int) -> Parity:
    import numpy as np
    import onnxruntime as ort
    import torch

    agree = total = 0
    max_abs = 0.0
    run_options = ort.RunOptions()
    if lora is not None:
        run_options.add_active_adapter(lora)
    for ids in sequences:
        start, onnx_logits = _cached_logits(session, ids, head_size, run_options)
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor([ids])).logits[0, start:].float().numpy()
        max_abs = max(max_abs, float(np.abs(onnx_logits - ref).max()))
        agree += int((onnx_logits.argmax(-1) == ref.argmax(-1)).sum())
        total += len(onnx_logits)
    return Parity(name, total, agree / total, max_abs)


PROMPT_TOKENS = 8  # each text's first tokens (at most half) are the prompt; the rest is read from the KV cache


def _cached_logits(session, ids: list[int], head_size: int, run_options):
    """Logits of a prompt, then of the rest of the text computed from the prompt's KV cache, as when
    generating: the cache (quantized, where the bundle's is) is on the measured path.

    A graph that computes every position's logits gives them all, the rest in one call; one built
    with prune_lm_head gives the prompt's last position, then each later token in turn.
    Returns (first position covered, logits from there on)."""
    import numpy as np

    split = min(PROMPT_TOKENS, len(ids) // 2)
    outputs = [o.name for o in session.get_outputs()]
    every = next(o for o in session.get_outputs() if o.name == "logits").shape[1] != 1
    result = dict(zip(outputs, session.run(outputs, _feeds(session, ids[:split], head_size), run_options)))
    logits = [result["logits"][0]] if every else [result["logits"][0, -1:]]
    chunks = [ids[split:]] if every else [[t] for t in ids[split:]]
    offset = split
    for chunk in chunks:
        past = {name.replace("present", "past_key_values"): value for name, value in result.items()
                if name.startswith("present")}
        result = dict(zip(outputs, session.run(outputs, _feeds(session, chunk, head_size, past, offset), run_options)))
        logits.append(result["logits"][0])
        offset += len(chunk)
    return (0 if every else split - 1), np.concatenate(logits).astype(np.float32)


def _feeds(session, ids: list[int], head_size: int, past: Optional[dict] = None, offset: int = 0) -> dict:
    """input_ids, attention_mask and the KV cache (empty unless given), in the dtypes the graph declares.

    The cache's last dimension is symbolic in graphs from onnxruntime-genai 0.15+ ('kv_cache_dim'):
    its size is the model's head size."""
    import numpy as np

    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.array([ids], dtype=dtypes[value.type])
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, offset + len(ids)), dtype=dtypes[value.type])
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(offset, offset + len(ids), dtype=dtypes[value.type])[None]
        elif value.name.startswith("past_key_values"):
            heads = value.shape[1]
            feeds[value.name] = past[value.name] if past else np.zeros((1, heads, 0, head_size), dtype=dtypes[value.type])
    return feeds


def _judge(report: ParityReport) -> None:
    base = report.rows[0]
    for row in report.rows:
        exact = report.precision == "fp32" and report.kv_cache == "fp32"  # else judged by agreement, as quantized
        if exact and row.max_abs_diff > MAX_ABS_FP32:
            report.failures.append(f"{row.name}: max |logit diff| {row.max_abs_diff:.2e} > {MAX_ABS_FP32:.0e}")
        cache_only = report.precision == "fp32" and report.kv_cache != "fp32"
        if cache_only and row.agreement < MIN_AGREEMENT_FP32_QUANTIZED_CACHE:
            report.failures.append(f"{row.name}: top-1 agreement {row.agreement:.1%} with fp32 weights is below "
                                   f"{MIN_AGREEMENT_FP32_QUANTIZED_CACHE:.0%}: the {report.kv_cache} KV cache loses it")
        if row is not base and row.agreement < base.agreement - MAX_AGREEMENT_DROP:
            report.failures.append(f"{row.name}: top-1 agreement {row.agreement:.1%} is more than "
                                   f"{MAX_AGREEMENT_DROP:.0%} below the base's {base.agreement:.1%}")


def adapter_sources(manifest: dict, overrides: dict[str, Path]) -> dict[str, Path]:
    """The PEFT folder of every adapter in the bundle: --adapter overrides, else where export found it."""
    records = {**(manifest.get("merged") or {}), **manifest["adapters"]}
    unknown = sorted(set(overrides) - set(records))
    if unknown:
        raise BundleError(f"--adapter names {', '.join(unknown)}, which the bundle does not have; "
                          f"it has {', '.join(records) or 'none'}")
    paths = {}
    for name, record in records.items():
        path = Path(overrides.get(name) or record.get("source") or "")
        if (path / "adapter" / "adapter_config.json").is_file():  # an `slmops finetune` output folder
            path = path / "adapter"
        if not (path / "adapter_config.json").is_file():
            raise BundleError(f"the PEFT adapter of '{name}' is not at '{path}' any more; "
                              f"pass --adapter {name}=PATH to compare against it")
        paths[name] = path
    return paths
