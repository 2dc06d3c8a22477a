"""Olive's LoRA and QLoRA passes, with batches of packed rows (`training.packing`).

A packed row holds several examples, each with position ids from 0 (slmops.training.data.pack).
Olive's collator keeps only input_ids, labels and attention_mask; this one keeps the position ids
and leaves the attention mask out, which is how transformers recognises packed sequences and
builds a block-diagonal causal mask: no token attends across examples.
"""

from __future__ import annotations

from olive.passes.pytorch.lora import LoRA

from slmops.training.data import IGNORE_INDEX
from slmops.training.passes.qlora import SlmopsQLoRA


def collate_packed(batch: list[dict], tokenizer) -> dict:
    """Pad packed rows: input_ids with the pad token, labels with IGNORE_INDEX, positions with a
    run of their own (padding is then one more 'example' that nothing attends to or learns)."""
    from torch.nn.utils.rnn import pad_sequence

    if "position_ids" not in batch[0]:
        return LoRA.collate_batch(batch, tokenizer)
    return {
        "input_ids": pad_sequence(
            [s["input_ids"] for s in batch], batch_first=True, padding_value=tokenizer.pad_token_id
        ),
        "labels": pad_sequence([s["labels"] for s in batch], batch_first=True, padding_value=IGNORE_INDEX),
        "position_ids": pad_sequence([s["position_ids"] for s in batch], batch_first=True, padding_value=0),
        # transformers 5 looks for packed sequences only without a KV cache, and a model in training
        # mode still makes one unless told not to: then every example would attend to those before it
        "use_cache": False,
    }


class SlmopsLoRA(LoRA):
    """Olive's LoRA pass, taking packed rows."""

    collate_batch = staticmethod(collate_packed)


class SlmopsPackedQLoRA(SlmopsQLoRA):
    """slmops' QLoRA pass, taking packed rows."""

    collate_batch = staticmethod(collate_packed)
