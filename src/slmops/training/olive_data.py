"""slmops' data components for Olive: registered in Olive's data registry on import.

Olive's own text pre-processing joins every example into one stream and cuts it into
max_seq_len chunks, so examples are spliced together, prompt tokens are trained on, and a
data set shorter than one chunk yields nothing. These components tokenise one example at a time
and mask the prompt (slmops.training.data.tokenize_sft); Olive's LoRA pass pads them per batch.
"""

from __future__ import annotations

from typing import Optional, Union

from olive.data.registry import Registry

from slmops.training import data

SFT_LOAD = "slmops_sft_dataset"
SFT_TOKENIZE = "slmops_sft_tokenize"
PREFERENCE_LOAD = "slmops_preference_dataset"


@Registry.register_dataset(SFT_LOAD)
def slmops_sft_dataset(
    source: dict,
    format: str = "auto",  # noqa: A002 - the recipe's own key name
    part: str = "train",
    eval_source: Optional[dict] = None,
    eval_split: Optional[Union[float, str]] = None,
    max_samples: Optional[int] = None,
    dedupe: bool = True,
    seed: int = 42,
    template: Optional[dict] = None,
    columns: Optional[dict] = None,
):
    """Normalised SFT examples of one part ("train" or "eval")."""
    return _part(
        "sft", format, source, part, eval_source, eval_split, max_samples, None, dedupe, seed, template, columns
    )


@Registry.register_pre_process(SFT_TOKENIZE)
def slmops_sft_tokenize(
    dataset,
    model_name: str,
    max_seq_len: int = 512,
    chat_template: bool = True,
    train_on: str = "all_assistant",
    packing: bool = False,
    trust_remote_code: bool = False,
):
    """input_ids / attention_mask / labels per example; only assistant text is trained (see data.tokenize_sft)."""
    import logging

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    stats = data.TokenStats()
    features = data.tokenize_sft(dataset, tokenizer, max_seq_len, chat_template, train_on, stats)
    if stats.truncated_rows or stats.last_turn_only:
        logging.getLogger("slmops").warning(data.truncation_note(stats, max_seq_len))
    return data.pack(features, max_seq_len) if packing else features


@Registry.register_dataset(PREFERENCE_LOAD)
def slmops_preference_dataset(
    source: dict,
    part: str = "train",
    eval_source: Optional[dict] = None,
    eval_split: Optional[Union[float, str]] = None,
    max_samples: Optional[int] = None,
    eval_max_samples: Optional[int] = None,
    dedupe: bool = True,
    seed: int = 42,
    columns: Optional[dict] = None,
):
    """Normalised preference pairs {prompt, chosen, rejected} of one part ("train" or "eval")."""
    return _part(
        "preference",
        "auto",
        source,
        part,
        eval_source,
        eval_split,
        max_samples,
        eval_max_samples,
        dedupe,
        seed,
        columns=columns,
    )


def _part(
    kind,
    fmt,
    source,
    part,
    eval_source,
    eval_split,
    max_samples,
    eval_max_samples,
    dedupe,
    seed,
    template=None,
    columns=None,
):
    train, held = data.load_splits(
        data.source_from_dict(source),
        kind,
        fmt,
        eval_source=data.source_from_dict(eval_source) if eval_source else None,
        eval_split=eval_split,
        max_samples=max_samples,
        drop_duplicates=dedupe,
        seed=seed,
        template=template,
        columns=columns,
    )
    return train if part == "train" else held[:eval_max_samples]
