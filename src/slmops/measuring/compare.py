"""A/B evaluation: the base model and one or more LoRA adapters on the same held-out examples.

Every example is scored by every model on identical token ids, so the metrics pair up:
- SFT data: eval loss (mean NLL over completion tokens, the prompt masked), perplexity
  exp(eval loss), and ROUGE-L F1 of greedy generations against the reference completion;
- preference data: preference accuracy (log p(chosen) > log p(rejected), summed over answer
  tokens) and the eval loss on the chosen answers.
Each adapter is tested against the base, and each against each other, with paired tests: a
sign-flip permutation test for per-example numbers, the exact McNemar test for right/wrong flags.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Iterator

from slmops.core.errors import ModelError, RunError
from slmops.training.data import fit_prompt, render_sft

BASE = "base"
SHOWN = 10  # generations written side by side in the report
EXACT_UP_TO = 16  # sign-flip tests enumerate all 2^n patterns up to this n, else sample
MONTE_CARLO = 20000


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class PairedTest:
    a: str
    b: str
    metric: str
    test: str  # "sign-flip" or "mcnemar"
    n: int
    mean_diff: float  # mean of (b - a) per example
    p_value: float


@dataclass
class Comparison:
    model: str
    data: str
    kind: str  # "sft" or "preference"
    rows: int  # examples in the file
    examples: int  # examples scored
    adapters: dict[str, str]  # name -> folder
    metrics: dict[str, dict[str, float]]  # model -> metric -> value
    tests: list[PairedTest]
    generations: list[dict]  # {"prompt", "reference", "outputs": {model: text}}
    per_example: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("per_example")  # large; the library caller has it
        return out


@dataclass(frozen=True)
class CompareRequest:
    model: str  # as the user named it
    model_path: Path
    adapters: dict[str, Path]
    data: str
    max_samples: int = 50
    max_new_tokens: int = 64
    max_length: int = 512
    batch_size: int = 8
    generate: bool = True
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Pure metrics and tests


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one row of the DP table kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens: P = LCS/len(candidate), R = LCS/len(reference)."""
    cand, ref = candidate.lower().split(), reference.lower().split()
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def sign_flip_test(diffs: list[float], samples: int = MONTE_CARLO, seed: int = 0) -> float:
    """Two-sided p-value of a paired permutation test that the mean difference is zero.

    Under the null each difference is as likely negative as positive, so the p-value is the share
    of sign patterns whose |sum| reaches the observed one: all 2^n of them for n <= EXACT_UP_TO,
    else `samples` random patterns ((count + 1) / (samples + 1), never 0).
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) * (1 - 1e-9) - 1e-12  # ties count as extreme despite float rounding
    if d.size <= EXACT_UP_TO:
        bits = (np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1
        return float((np.abs((1 - 2 * bits) @ d) >= observed).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(samples, d.size))
    return float(((np.abs(signs @ d) >= observed).sum() + 1) / (samples + 1))


def mcnemar_test(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant pairs (right by one model only)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_test(a: str, b: str, metric: str, xs: list[float], ys: list[float], seed: int = 0) -> PairedTest:
    """McNemar for 0/1 flags ("correct"), the sign-flip test for anything else."""
    diffs = [y - x for x, y in zip(xs, ys)]
    if metric == "correct":
        p = mcnemar_test(sum(d < 0 for d in diffs), sum(d > 0 for d in diffs))
        test = "mcnemar"
    else:
        p = sign_flip_test(diffs, seed=seed)
        test = "sign-flip"
    mean = sum(diffs) / len(diffs) if diffs else 0.0
    return PairedTest(a, b, metric, test, len(diffs), round(mean, 4) + 0.0, float(f"{p:.4g}"))


def all_tests(per_example: dict[str, dict[str, list[float]]], seed: int = 0) -> list[PairedTest]:
    """Every model against the base, then every adapter against every other, on every metric."""
    names = list(per_example)
    pairs = [(BASE, n) for n in names if n != BASE] + list(combinations([n for n in names if n != BASE], 2))
    return [
        paired_test(a, b, metric, per_example[a][metric], per_example[b][metric], seed)
        for a, b in pairs
        for metric in per_example[a]
    ]


# ---------------------------------------------------------------------------------------------
# Inputs


def adapter_folder(name: str, path: Path) -> Path:
    """The PEFT folder of an adapter: the path itself, or a finetune output's adapter/."""
    if name == BASE or not name.replace("-", "").replace("_", "").isalnum():  # PEFT names modules after it
        raise ModelError(
            f"adapter name '{name}' is not usable: it must not be '{BASE}' and may hold only "
            "letters, digits, '-' and '_'; pass --adapter NAME=PATH"
        )
    path = Path(path).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"adapter '{name}': '{path}' has no adapter_config.json; pass a PEFT adapter folder "
            "or an `slmops finetune` output folder"
        )
    return path


def read_eval_data(path: str) -> tuple[str, list[dict]]:
    """("preference" | "sft", normalised examples) of a data file; the kind is read from its columns."""
    from slmops.training.data import locate, normalise_preference, normalise_sft, read_rows

    source = locate(path, None)
    rows = read_rows(source)
    if {"chosen", "rejected"} & set(rows[0][1]):
        return "preference", normalise_preference(rows, source.label)
    return "sft", normalise_sft(rows, source.label)


# ---------------------------------------------------------------------------------------------
# Running the models


def compare(req: CompareRequest) -> Comparison:
    """Score (and generate from) the base and every adapter on the first max_samples examples."""
    if not req.adapters:
        raise RunError("nothing to compare the base with; pass at least one --adapter NAME=PATH")
    folders = {name: adapter_folder(name, path) for name, path in req.adapters.items()}
    kind, examples = read_eval_data(req.data)
    sample = examples[: req.max_samples]
    tokenizer, model = _load(req.model_path, folders)
    run = _sft if kind == "sft" else _preference
    metrics, per_example, generations = run(req, model, tokenizer, sample, [BASE, *folders])
    return Comparison(
        req.model,
        req.data,
        kind,
        len(examples),
        len(sample),
        {n: str(p) for n, p in folders.items()},
        metrics,
        all_tests(per_example, req.seed),
        generations,
        per_example,
    )


def _load(model_path: Path, folders: dict[str, Path]):
    """The base once, with every adapter loaded into it by name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # generation continues the prompt's end
    model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    name = None
    try:
        for name, folder in folders.items():
            if isinstance(model, PeftModel):
                model.load_adapter(folder, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(
            f"adapter '{name}' does not fit the model ({_why(exc)}); "
            "pass the base model the adapter was trained on with --model"
        ) from None
    return tokenizer, model.eval()


def _why(exc: Exception) -> str:
    """The telling line of a PEFT load error: the first size mismatch, else the first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return next((line for line in lines if "size mismatch" in line), lines[0])[:200]


@contextmanager
def _active(model, name: str) -> Iterator[None]:
    """Run `model` as the base (adapters off) or as one adapter."""
    if name == BASE:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


def _sft(req: CompareRequest, model, tokenizer, examples: list[dict], names: list[str]):
    from slmops.training.data import tokenize_sft

    sequences = [(f["input_ids"], f["labels"]) for f in tokenize_sft(examples, tokenizer, req.max_length)]
    prompted = [e for e in examples if e["prompt"]] if req.generate else []  # plain text has nothing to answer
    prompts = [render_sft(e, tokenizer)[0] for e in prompted]
    metrics, per_example, outputs = {}, {}, {}
    for name in names:
        with _active(model, name):
            totals, counts = _score_sequences(model, sequences, tokenizer, req, name)
            texts = _generate(model, tokenizer, prompts, req, name) if prompts else []
        per_example[name] = {"nll": [-t / max(c, 1) for t, c in zip(totals, counts)]}
        metrics[name] = _loss_metrics(totals, counts)
        if prompts:
            per_example[name]["rouge_l"] = [rouge_l(t, e["completion"]) for t, e in zip(texts, prompted)]
            metrics[name]["rouge_l"] = round(_mean(per_example[name]["rouge_l"]), 4)
        outputs[name] = texts
    shown = [
        {"prompt": _prompt_text(e), "reference": e["completion"], "outputs": {n: outputs[n][i] for n in names}}
        for i, e in enumerate(prompted[:SHOWN])
    ]
    return metrics, per_example, shown


def _preference(req: CompareRequest, model, tokenizer, pairs: list[dict], names: list[str]):
    from slmops.measuring.evaluate import pair_features, score_pairs

    features = pair_features(pairs, tokenizer, req.max_length)
    shown_pairs = pairs[:SHOWN] if req.generate else []
    prompts = [
        render_sft({"prompt": fit_prompt(p, tokenizer, req.max_length)["prompt"], "completion": ""}, tokenizer)[0]
        for p in shown_pairs
    ]
    score = partial(score_pairs, tokenizer=tokenizer, batch_size=req.batch_size, progress=req.progress)
    metrics, per_example, outputs = {}, {}, {}
    for name in names:
        with _active(model, name):
            s = score(model, features, label=name)
            outputs[name] = _generate(model, tokenizer, prompts, req, name) if prompts else []
        correct = [float(c > r) for c, r in zip(s.chosen, s.rejected)]
        per_example[name] = {"correct": correct, "nll": [-t / max(n, 1) for t, n in zip(s.chosen, s.chosen_tokens)]}
        metrics[name] = {"preference_accuracy": round(_mean(correct), 4), **_loss_metrics(s.chosen, s.chosen_tokens)}
    shown = [
        {"prompt": _prompt_text(p), "reference": p["chosen"], "outputs": {n: outputs[n][i] for n in names}}
        for i, p in enumerate(shown_pairs)
    ]
    return metrics, per_example, shown


def _score_sequences(model, sequences: list[tuple], tokenizer, req: CompareRequest, label: str):
    from slmops.measuring.evaluate import score_sequences

    return score_sequences(
        model, sequences, tokenizer=tokenizer, batch_size=req.batch_size, progress=req.progress, label=label
    )


def _generate(model, tokenizer, prompts: list[str], req: CompareRequest, label: str) -> list[str]:
    """Greedy completions, in batches (left-padded, prompts cut from the left to max_length)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(req.seed)
    texts = []
    batches = range(0, len(prompts), req.batch_size)
    for start in tqdm(batches, desc=f"generating {label}", disable=not req.progress, unit="batch"):
        enc = tokenizer(
            prompts[start : start + req.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=True,
            max_length=req.max_length,
        )
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=req.max_new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts += [
            t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return texts


def _loss_metrics(totals: list[float], counts: list[int]) -> dict:
    """Token-weighted mean NLL and its perplexity."""
    loss = -sum(totals) / max(sum(counts), 1)
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(loss), 4)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _prompt_text(example: dict) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in example["prompt"])


# ---------------------------------------------------------------------------------------------
# The report

COLUMNS = {
    "sft": [("eval_loss", "eval loss"), ("perplexity", "perplexity"), ("rouge_l", "ROUGE-L F1")],
    "preference": [
        ("preference_accuracy", "preference accuracy"),
        ("eval_loss", "eval loss (chosen)"),
        ("perplexity", "perplexity (chosen)"),
    ],
}


def render_markdown(c: Comparison) -> str:
    """The report: header, metrics table, paired tests, side-by-side generations."""
    adapters = ", ".join(f"`{n}` ({p})" for n, p in c.adapters.items())
    lines = [
        "# slmops compare",
        "",
        f"- model: `{c.model}`",
        f"- adapters: {adapters}",
        f"- data: `{c.data}` ({c.kind}, {c.examples} of {c.rows} examples)",
        "",
        "## Metrics",
        "",
    ]
    columns = [(key, title) for key, title in COLUMNS[c.kind] if key in c.metrics[BASE]]
    lines += _table(
        ["model", *(t for _, t in columns)],
        [[name, *(f"{m[key]:.4f}" for key, _ in columns)] for name, m in c.metrics.items()],
    )
    lines += [
        "",
        "## Paired tests",
        "",
        "Sign-flip permutation test on per-example values, exact McNemar on right/wrong pairs; "
        "two-sided. Mean diff is B minus A. `nll` is each example's mean token NLL (the eval loss "
        "above is token-weighted over all examples).",
        "",
    ]
    lines += _table(
        ["A", "B", "metric", "test", "n", "mean diff", "p-value"],
        [[t.a, t.b, t.metric, t.test, str(t.n), f"{t.mean_diff:+.4f}", f"{t.p_value:.4g}"] for t in c.tests],
    )
    if c.generations:
        lines += ["", "## Generations", ""]
        for i, g in enumerate(c.generations, start=1):
            lines += [
                f"### {i}",
                "",
                "**prompt**",
                "",
                *_fenced(g["prompt"]),
                "",
                "**reference**",
                "",
                *_fenced(g["reference"]),
                "",
            ]
            for name, text in g["outputs"].items():
                lines += [f"**{name}**", "", *_fenced(text), ""]
    return "\n".join(lines).rstrip() + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _fenced(text: str) -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)  # a fence the text cannot close
    return [fence + "text", text, fence]


def write_report(text: str, path: Path) -> None:
    """Write whole or not at all: a temporary file beside `path`, then renamed over it."""
    from slmops.core.files import write_text

    write_text(Path(path), text)


def to_json(c: Comparison) -> str:
    return json.dumps(c.to_dict(), indent=2)
