"""What a recipe trains on, token by token: `slmops data preview`.

The same reading, chat template and masking as a fine-tune (data.load_splits, data.tokenize_sft;
for preference pairs the prompt fitted as the DPO pass fits it, and the answers rendered as TRL
renders a conversational pair, truncated at the end), so what is shown is what is trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from slmops.training import data as data_mod
from slmops.training.recipe import Recipe


@dataclass
class Token:
    id: int
    text: str
    trained: bool


@dataclass
class PreviewRow:
    kind: str  # "sft", or "chosen" / "rejected" of a preference pair
    number: int  # the example's position in the training data (0-based)
    tokens: list[Token]


@dataclass
class PreviewStats:
    stage: str
    rows: int
    tokens: int
    trained_share: float
    padding_share: float  # of the tokens in batches padded to their longest row (training.batch_size)
    truncated_rows: int
    dropped_turns: int = 0
    last_turn_only: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Preview:
    stats: list[PreviewStats]
    rows: list[PreviewRow]

    def to_json(self) -> dict:
        return {"stats": [asdict(s) for s in self.stats], "rows": [asdict(r) for r in self.rows]}


def preview(recipe: Recipe, rows: int = 3) -> Preview:
    """Every stage's statistics over all its training rows, and the first `rows` rows token by token."""
    from transformers import AutoTokenizer

    from slmops.core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(recipe.model.name).path, trust_remote_code=recipe.model.trust_remote_code
    )
    out = Preview([], [])
    if recipe.data is not None:
        _sft(recipe, tokenizer, rows, out)
    if recipe.dpo is not None:
        _preference(recipe, tokenizer, rows, out)
    return out


def _sft(recipe: Recipe, tokenizer, rows: int, out: Preview) -> None:
    section = recipe.data
    assert section is not None
    examples = data_mod.load_section(section, "sft", recipe.training.seed)[2]
    stats = data_mod.TokenStats()
    features = data_mod.tokenize_sft(
        examples, tokenizer, section.max_seq_len, section.chat_template, section.train_on, stats
    )
    note = data_mod.truncation_note(stats, section.max_seq_len)
    out.stats.append(
        PreviewStats(
            "sft",
            stats.rows,
            stats.tokens,
            _share(stats.trained, stats.tokens),
            _padding([len(f["input_ids"]) for f in features], recipe.training.batch_size),
            stats.truncated_rows,
            stats.dropped_turns,
            stats.last_turn_only,
            [note] if note else [],
        )
    )
    for number, feature in enumerate(features[:rows]):
        out.rows.append(PreviewRow("sft", number, _tokens(tokenizer, feature["input_ids"], feature["labels"])))


def _preference(recipe: Recipe, tokenizer, rows: int, out: Preview) -> None:
    dpo = recipe.dpo
    assert dpo is not None
    examples = data_mod.load_section(dpo.data, "preference", recipe.training.seed)[2]
    lengths, tokens, trained, truncated = [], 0, 0, 0
    shown: list[PreviewRow] = []
    for number, pair in enumerate(examples):
        fitted = data_mod.fit_prompt(pair, tokenizer, dpo.max_length)
        cut = fitted["prompt"] != pair["prompt"]  # DPO's prompt lost turns, or an answer runs past max_length
        for side in ("chosen", "rejected"):
            prompt, answer = data_mod.render_sft({"prompt": fitted["prompt"], "completion": fitted[side]}, tokenizer)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = (p_ids + a_ids)[: dpo.max_length]
            labels = ([data_mod.IGNORE_INDEX] * len(p_ids) + a_ids)[: dpo.max_length]
            cut = cut or len(p_ids) + len(a_ids) > dpo.max_length
            lengths.append(len(ids))
            tokens += len(ids)
            trained += sum(label != data_mod.IGNORE_INDEX for label in labels)
            if number < rows:
                shown.append(PreviewRow(side, number, _tokens(tokenizer, ids, labels)))
        truncated += cut
    out.stats.append(
        PreviewStats(
            "dpo",
            len(examples),
            tokens,
            _share(trained, tokens),
            _padding(lengths, 2 * dpo.batch_size),  # chosen and rejected of batch_size pairs share a batch
            truncated,
        )
    )
    out.rows.extend(shown)


def _tokens(tokenizer, ids: list[int], labels: list[int]) -> list[Token]:
    return [Token(int(i), tokenizer.decode([i]), label != data_mod.IGNORE_INDEX) for i, label in zip(ids, labels)]


def _padding(lengths: list[int], batch_size: int) -> float:
    """The share of padding when rows, in order, are batched and each batch padded to its longest."""
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return _share(padded - sum(lengths), padded)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0
