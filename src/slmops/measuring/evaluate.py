"""Held-out preference evaluation: does the model prefer the chosen answer, and did DPO move it?

For each pair (prompt, chosen, rejected), with log p(answer | prompt) summed over answer tokens:
- preference accuracy: fraction of pairs where the model gives chosen the higher log-probability
  (summed, and normalised by answer length);
- implicit reward r = beta * (log p_policy - log p_reference); reward accuracy is the fraction with
  r_chosen > r_rejected, the margin is mean(r_chosen - r_rejected), and the eval loss is DPO's
  sigmoid loss mean(-log sigmoid(r_chosen - r_rejected)).
The reference is the base model (adapter disabled) or another adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

from slmops.core.errors import ModelError
from slmops.training.data import IGNORE_INDEX, fit_prompt, render_sft


@dataclass
class PairScores:
    """Summed log-probabilities of the answers and their token counts, per pair."""

    chosen: list[float]
    rejected: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]


@dataclass
class PreferenceReport:
    pairs: int
    beta: float
    model: str
    adapter: Optional[str]
    reference: str
    preference_accuracy: float  # summed log-probs
    preference_accuracy_normalised: float  # per-token log-probs
    reward_accuracy: Optional[float] = None
    reward_margin: Optional[float] = None
    eval_loss: Optional[float] = None
    reference_preference_accuracy: Optional[float] = None
    reference_preference_accuracy_normalised: Optional[float] = None


def preference_metrics(policy: PairScores, reference: Optional[PairScores], beta: float) -> dict:
    """The report's numbers from scores; pure, so it can be checked on a hand-made case."""
    n = len(policy.chosen)
    metrics = {
        "preference_accuracy": _frac(c > r for c, r in zip(policy.chosen, policy.rejected)),
        "preference_accuracy_normalised": _frac(
            c / max(nc, 1) > r / max(nr, 1)
            for c, r, nc, nr in zip(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens)
        ),
    }
    if reference is None:
        return metrics
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(policy.chosen, reference.chosen, policy.rejected, reference.rejected)
    ]
    metrics.update(
        reward_accuracy=_frac(m > 0 for m in margins),
        reward_margin=round(sum(margins) / n, 4),
        eval_loss=round(sum(_softplus(-m) for m in margins) / n, 4),
        reference_preference_accuracy=_frac(c > r for c, r in zip(reference.chosen, reference.rejected)),
        reference_preference_accuracy_normalised=_frac(
            c / max(nc, 1) > r / max(nr, 1)
            for c, r, nc, nr in zip(
                reference.chosen, reference.rejected, reference.chosen_tokens, reference.rejected_tokens
            )
        ),
    )
    return metrics


def _frac(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def evaluate_preferences(
    model_path: Path,
    pairs: list[dict],
    adapter: Optional[Path] = None,
    reference_adapter: Optional[Path] = None,
    beta: float = 0.1,
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    dtype: str = "float32",
) -> PreferenceReport:
    """Score every pair under the policy (base + adapter) and the reference (base, or another adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (adapter, reference_adapter):
        if path is not None and not (Path(path) / "adapter_config.json").is_file():
            raise ModelError(
                f"adapter '{path}' is not a PEFT adapter folder (no adapter_config.json); "
                "pass the adapter/ folder of a finetune run"
            )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    features = pair_features(pairs, tokenizer, max_length)
    score = partial(score_pairs, tokenizer=tokenizer, batch_size=batch_size, progress=progress, dtype=dtype)
    reference_label = "base" if reference_adapter is None else str(reference_adapter)
    if adapter is None:
        scores = score(model, features, label="base")
        metrics = preference_metrics(scores, None, beta)
        return PreferenceReport(len(pairs), beta, str(model_path), None, reference_label, **metrics)
    model = _with_adapters(PeftModel, model, adapter, reference_adapter)
    model.set_adapter("policy")
    policy = score(model, features, label="adapter")
    if reference_adapter is None:
        with model.disable_adapter():
            reference = score(model, features, label="reference (base)")
    else:
        model.set_adapter("reference")
        reference = score(model, features, label="reference adapter")
    metrics = preference_metrics(policy, reference, beta)
    return PreferenceReport(len(pairs), beta, str(model_path), str(adapter), reference_label, **metrics)


def _with_adapters(peft_model_cls, model, adapter: Path, reference_adapter: Optional[Path]):
    try:
        wrapped = peft_model_cls.from_pretrained(model, adapter, adapter_name="policy")
        if reference_adapter is not None:
            wrapped.load_adapter(reference_adapter, adapter_name="reference")
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(
            f"adapter does not fit the model ({str(exc).splitlines()[0][:200]}); "
            "pass the base model the adapter was trained on"
        ) from None
    return wrapped


def pair_features(pairs: list[dict], tokenizer, max_length: int) -> list[dict]:
    """For each pair, the token ids and labels of prompt+chosen and prompt+rejected."""
    features = []
    for pair in pairs:
        fitted = fit_prompt(pair, tokenizer, max_length)
        sides = {}
        for side in ("chosen", "rejected"):
            prompt, completion = render_sft({"prompt": fitted["prompt"], "completion": fitted[side]}, tokenizer)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = (p_ids + c_ids)[:max_length]
            labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:max_length]
            sides[side] = (ids, labels)
        features.append(sides)
    return features


def score_pairs(
    model, features: list[dict], *, tokenizer, batch_size: int, progress: bool, label: str, dtype: str = "float32"
) -> PairScores:
    sequences = [f[side] for f in features for side in ("chosen", "rejected")]
    totals, counts = score_sequences(
        model, sequences, tokenizer=tokenizer, batch_size=batch_size, progress=progress, label=label, dtype=dtype
    )
    return PairScores(totals[0::2], totals[1::2], counts[0::2], counts[1::2])


def score_sequences(
    model,
    sequences: list[tuple[list[int], list[int]]],
    *,
    tokenizer,
    batch_size: int,
    progress: bool,
    label: str,
    dtype: str = "float32",
) -> tuple[list[float], list[int]]:
    """Summed log p of the labelled tokens, and their count, for each (input ids, labels) sequence."""
    import torch
    from tqdm import tqdm

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    totals, counts = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = range(0, len(sequences), batch_size)
    for start in tqdm(batches, desc=f"scoring {label}", disable=not progress, unit="batch"):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in chunk])
        labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in chunk])
        with torch.no_grad(), autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals += (logps * keep).sum(-1).tolist()
        counts += keep.sum(-1).tolist()
    return totals, counts


def recipe_pairs(recipe, split: str = "eval") -> list[dict]:
    """The recipe's preference pairs: its held-out part (the default), its training part, or all."""
    from slmops.core.errors import RecipeError
    from slmops.training.data import load_splits, locate_section

    if recipe.dpo is None:
        raise RecipeError(f"recipe {recipe.name} has no dpo section; pass --data PREFS instead")
    p = recipe.dpo.data
    source, eval_source = locate_section(p)
    if split == "all":
        return load_splits(source, "preference", drop_duplicates=p.dedupe, columns=p.columns)[0]
    train, held = load_splits(
        source,
        "preference",
        eval_source=eval_source,
        eval_split=p.eval_split,
        drop_duplicates=p.dedupe,
        seed=recipe.training.seed,
        columns=p.columns,
    )
    if split == "eval" and not held:
        raise RecipeError(
            f"recipe {recipe.name} holds no pairs out (dpo.data.eval_split / eval_file); "
            "use --split all or pass --data PREFS"
        )
    return held if split == "eval" else train


def file_pairs(path: str) -> list[dict]:
    from slmops.training.data import locate, normalise_preference, read_rows

    source = locate(path, None)
    return normalise_preference(read_rows(source), source.label)
