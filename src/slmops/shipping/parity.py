"""Fidelity of a bundle against PyTorch + PEFT: logits of the base and of each adapter on held-out text.

Per row (base, each adapter): top-1 agreement with PyTorch fp32 at every position, the KL divergence
KL(PyTorch || bundle) of the next-token distributions (mean and p99), and both perplexities.
fp32 bundles: the largest absolute logit difference must be <= 1e-3. Quantized bundles (weights or
KV cache): each adapter's agreement must be within 5 points of the base's, so the adapter path adds no
error of its own; with fp32 weights and an int8 cache, every row must agree at least 90% of the time;
with min_agreement, every row must reach it.
After a prompt of at most 8 tokens, every text is computed from the KV cache, so a quantized cache is measured.

The texts: a file of the user's (.txt: one stream cut into windows, as llama.cpp's perplexity reads it;
.jsonl/.json/.csv/.parquet: one text per row, in any format `slmops finetune` reads), else the held-out
rows of the recipes the bundle's adapters were trained with, else the built-in texts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from slmops.core.errors import DataError
from slmops.shipping.manifest import BundleError, BundleManifest

MAX_ABS_FP32 = 1e-3
MAX_AGREEMENT_DROP = 0.05
MIN_AGREEMENT_FP32_QUANTIZED_CACHE = 0.9  # fp32 weights with an int8 cache: the cache alone may not cost more
MAX_TOKENS = 128  # tokens per text (a .txt is cut into windows of this many)
MAX_TEXTS = 16  # held-out rows taken from each adapter's recipe (~2,000 positions each on SmolLM2)


@dataclass
class Parity:
    name: str  # "base" or an adapter name
    positions: int
    agreement: float  # top-1 agreement with PyTorch fp32 over all positions
    max_abs_diff: float  # largest |logit difference| (meaningful for fp32 bundles)
    kl_mean: float = 0.0  # KL(PyTorch || bundle) of the next-token distribution, nats, mean over positions
    kl_p99: float = 0.0
    ppl: float = 0.0  # the bundle's perplexity on the texts' next tokens
    ppl_reference: float = 0.0  # PyTorch's, on the same positions

    @property
    def ppl_delta(self) -> float:
        """Relative change of perplexity, bundle vs PyTorch (0.01 = 1% higher)."""
        return self.ppl / self.ppl_reference - 1 if self.ppl_reference else 0.0


@dataclass
class ParityReport:
    precision: str
    texts: int
    kv_cache: str = "fp32"  # the cache each text is read from after its prompt
    source: str = "built-in texts"  # where the texts came from
    min_agreement: Optional[float] = None
    rows: list[Parity] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def held_out_texts() -> list[str]:
    """Text no shipped recipe trains on, written for this check (instructions, facts, dialogue, code)."""
    return json.loads(resources.files("slmops.shipping").joinpath("parity_texts.json").read_text(encoding="utf-8"))


def require_texts_file(path: Path) -> Path:
    """--texts names a file that exists (checked before any work that would be wasted on a typo)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--texts {path}: no such file; give a .txt or a .jsonl/.json/.csv/.parquet of texts")
    return path


def file_texts(path: Path, tokenizer) -> list[list[int]]:
    """Token windows of the user's texts: a .txt stream cut into MAX_TOKENS windows, or one text per data row."""
    from slmops.training import data as data_mod

    path = require_texts_file(path)
    if path.suffix == ".txt":
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        windows = [ids[i : i + MAX_TOKENS] for i in range(0, len(ids), MAX_TOKENS)]
    elif path.suffix in data_mod.SUFFIXES:
        rows = data_mod.read_rows(data_mod.DataSource(path=str(path)))
        windows = [_ids(tokenizer, text) for text in _row_texts(rows, str(path), tokenizer)]
    else:
        raise DataError(f"--texts {path}: expected a .txt, or one of {', '.join(data_mod.SUFFIXES)}")
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise DataError(f"--texts {path}: no text of at least 2 tokens in it; give a file with some text")
    return windows


def recorded_texts(manifest: BundleManifest, tokenizer, max_texts: int = MAX_TEXTS) -> tuple[list[list[int]], str]:
    """The held-out rows of the recipes the bundle's adapters were fine-tuned with (those that hold some out)."""
    from slmops.training.recipe import load_recipe

    texts, recipes = [], []
    for source in manifest.fidelity_sources().values():
        folder = Path(source)
        folder = folder.parent if folder.name == "adapter" else folder
        if not (folder / "recipe.yaml").is_file():
            continue
        recipe = load_recipe(str(folder / "recipe.yaml"))
        assert recipe.name is not None  # load_recipe names every recipe
        run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
        held = _held_out(recipe, run.get("data") or {}, tokenizer)
        if held:
            texts += [t for t in held[:max_texts] if t not in texts]
            recipes.append(recipe.name)
    windows = [w for w in (_ids(tokenizer, t) for t in texts) if len(w) >= 2]
    return windows, f"held-out rows of {', '.join(dict.fromkeys(recipes))}"


def _held_out(recipe, recorded: dict, tokenizer) -> list[str]:
    """The recipe's held-out rows, read from the file its run recorded (where it still has the same hash)."""
    from slmops.core.files import file_sha256
    from slmops.training import data as data_mod

    texts = []
    for stage, section, kind in (
        ("sft", recipe.data, "sft"),
        ("dpo", recipe.dpo.data if recipe.dpo else None, "preference"),
    ):
        if section is None or not (section.eval_split or section.eval_file):
            continue
        record = recorded.get(stage) or {}
        path = Path(record.get("path") or "")
        if record.get("sha256") and path.is_file() and file_sha256(path) == record["sha256"]:
            train = data_mod.DataSource(path=str(path), sha256=record["sha256"], split=record.get("split", "train"))
            evaluation = data_mod.locate_section(section)[1] if section.eval_file else None
        else:
            train, evaluation = data_mod.locate_section(section)
        extra = (
            {"fmt": section.format, "template": section.template.model_dump() if section.template else None}
            if kind == "sft"
            else {}
        )
        _, held = data_mod.load_splits(
            train,
            kind,
            eval_source=evaluation,
            eval_split=section.eval_split,
            drop_duplicates=section.dedupe,
            seed=recipe.training.seed,
            columns=section.columns,
            **extra,
        )
        texts += [_render(example, tokenizer) for example in held]
    return texts


def _row_texts(rows, label: str, tokenizer) -> list[str]:
    """One text per row: plain `text`, or a prompt and its answer (the chosen one for preference pairs)."""
    from slmops.training import data as data_mod

    columns = set(rows[0][1]) if rows else set()
    if {"chosen", "rejected"} <= columns:
        examples = data_mod.normalise_preference(rows, label)
    else:
        examples = data_mod.normalise_sft(rows, label)
    return [_render(example, tokenizer) for example in examples]


def _render(example: dict, tokenizer) -> str:
    from slmops.training.data import render_sft

    if "chosen" in example:
        example = {"prompt": example["prompt"], "completion": example["chosen"]}
    prompt, completion = render_sft(example, tokenizer)
    return prompt + completion


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]


def check_parity(
    bundle: Path,
    manifest: BundleManifest,
    model_path: Path,
    adapter_paths: dict[str, Path],
    texts: Optional[Path] = None,
    min_agreement: Optional[float] = None,
    max_texts: int = MAX_TEXTS,
    stop_below: bool = False,
) -> ParityReport:
    """Run base and adapters through the bundle (onnxruntime) and PyTorch, and judge the differences.

    texts: a file of the user's texts (default: the adapters' held-out rows, else the built-in texts);
    max_texts: at most this many per source; stop_below: skip the rest once a row is below min_agreement."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    sequences, source = _texts(bundle, manifest, tokenizer, texts, max_texts)
    session = _session(bundle / "model.onnx")
    head_size = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    torch_model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    precision = manifest.quantization.precision
    report = ParityReport(precision, len(sequences), manifest.kv_cache.dtype, source, min_agreement)
    report.rows.append(_compare("base", session, None, torch_model, sequences, head_size))
    below = stop_below and min_agreement is not None and report.rows[0].agreement < min_agreement
    if adapter_paths and not below:
        from slmops.core.models import with_adapters

        peft_model = with_adapters(torch_model, adapter_paths)
        for name in adapter_paths:
            peft_model.set_adapter(name)
            if name in manifest.adapters:
                lora = ort.LoraAdapter()
                lora.Load(str(manifest.adapter_file(bundle, name)))
                report.rows.append(_compare(name, session, lora, peft_model, sequences, head_size))
                if stop_below and min_agreement is not None and report.rows[-1].agreement < min_agreement:
                    break
            if name in manifest.merged:  # the merged variant must match the same PEFT model
                merged = _session(bundle / manifest.merged[name].folder / "model.onnx")
                report.rows.append(_compare(f"merged:{name}", merged, None, peft_model, sequences, head_size))
    _judge(report)
    return report


def _texts(
    bundle: Path, manifest: BundleManifest, tokenizer, texts: Optional[Path], max_texts: int
) -> tuple[list[list[int]], str]:
    if texts is not None:
        return file_texts(texts, tokenizer), str(texts)
    recorded, source = recorded_texts(manifest, tokenizer, max_texts)
    if recorded:
        return recorded, source
    built_in = [_ids(tokenizer, t) for t in held_out_texts()]
    return [s for s in built_in if len(s) >= 2], "built-in texts"


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
    kl, nll, nll_ref = [], [], []
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
        log_p, log_q = _log_softmax(ref), _log_softmax(onnx_logits)
        kl.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        following = np.array(ids[start + 1 :])  # the next token of every position but the last
        nll_ref.append(-log_p[np.arange(len(following)), following])
        nll.append(-log_q[np.arange(len(following)), following])
    kl_all = np.concatenate(kl)
    return Parity(
        name,
        total,
        agree / total,
        max_abs,
        float(kl_all.mean()),
        float(np.percentile(kl_all, 99)),
        float(np.exp(np.concatenate(nll).mean())),
        float(np.exp(np.concatenate(nll_ref).mean())),
    )


def _log_softmax(logits):
    import numpy as np

    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


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
        past = {
            name.replace("present", "past_key_values"): value
            for name, value in result.items()
            if name.startswith("present")
        }
        result = dict(zip(outputs, session.run(outputs, _feeds(session, chunk, head_size, past, offset), run_options)))
        logits.append(result["logits"][0])
        offset += len(chunk)
    return (0 if every else split - 1), np.concatenate(logits).astype(np.float32)


def _feeds(session, ids: list[int], head_size: int, past: Optional[dict] = None, offset: int = 0) -> dict:
    """input_ids, attention_mask and the KV cache (empty unless given), in the dtypes the graph declares.

    The cache's last dimension is symbolic in graphs from onnxruntime-genai 0.15+ ('kv_cache_dim'):
    its size is the model's head size."""
    import numpy as np

    dtypes = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
    }
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
            feeds[value.name] = (
                past[value.name] if past else np.zeros((1, heads, 0, head_size), dtype=dtypes[value.type])
            )
    return feeds


def _judge(report: ParityReport) -> None:
    base = report.rows[0]
    for row in report.rows:
        exact = report.precision == "fp32" and report.kv_cache == "fp32"  # else judged by agreement, as quantized
        if exact and row.max_abs_diff > MAX_ABS_FP32:
            report.failures.append(f"{row.name}: max |logit diff| {row.max_abs_diff:.2e} > {MAX_ABS_FP32:.0e}")
        cache_only = report.precision == "fp32" and report.kv_cache != "fp32"
        if cache_only and row.agreement < MIN_AGREEMENT_FP32_QUANTIZED_CACHE:
            report.failures.append(
                f"{row.name}: top-1 agreement {row.agreement:.1%} with fp32 weights is below "
                f"{MIN_AGREEMENT_FP32_QUANTIZED_CACHE:.0%}: the {report.kv_cache} KV cache loses it"
            )
        if report.min_agreement is not None and row.agreement < report.min_agreement:
            report.failures.append(
                f"{row.name}: top-1 agreement {row.agreement:.1%} is below --min-agreement {report.min_agreement:.1%}"
            )
        if row is not base and row.agreement < base.agreement - MAX_AGREEMENT_DROP:
            report.failures.append(
                f"{row.name}: top-1 agreement {row.agreement:.1%} is more than "
                f"{MAX_AGREEMENT_DROP:.0%} below the base's {base.agreement:.1%}"
            )


def adapter_sources(manifest: BundleManifest, overrides: dict[str, Path]) -> dict[str, Path]:
    """The PEFT folder of every adapter in the bundle: --adapter overrides, else where export found it."""
    records = manifest.fidelity_sources()
    unknown = sorted(set(overrides) - set(records))
    if unknown:
        raise BundleError(
            f"--adapter names {', '.join(unknown)}, which the bundle does not have; "
            f"it has {', '.join(records) or 'none'}"
        )
    paths = {}
    for name, source in records.items():
        path = Path(overrides.get(name) or source)
        if (path / "adapter" / "adapter_config.json").is_file():  # an `slmops finetune` output folder
            path = path / "adapter"
        if not (path / "adapter_config.json").is_file():
            raise BundleError(
                f"the PEFT adapter of '{name}' is not at '{path}' any more; "
                f"pass --adapter {name}=PATH to compare against it"
            )
        paths[name] = path
    return paths
