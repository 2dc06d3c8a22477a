"""DPO with each pair's prompt computed once: TRL's DPOTrainer over a backbone that shares prefixes.

TRL feeds a DPO batch as 2B rows, [chosen_1..chosen_B; rejected_1..rejected_B], each prompt +
answer, left-aligned. A pair's two rows start with the same tokens (the whole prompt, often the
answers' first words too), and a causal model's hidden state at a position depends only on the
tokens up to it. So the backbone runs one row per pair instead: chosen, then the rejected
answer's own tail, whose positions continue from the shared prefix and whose 4D attention mask
hides the chosen tail. The hidden states are scattered back into TRL's 2B-row layout, so TRL's
losses, metrics, reference pass and token counts are untouched. On hh-rlhf prompts are about 65%
of a pair's tokens, so the backbone sees about a third fewer tokens (the prefix-sharing idea of
Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing").

It is the same computation: in fp32, tests/test_shared_prompt.py finds log-probs and gradients equal
to 1e-5; in bf16 the two layouts round differently, within bf16's tolerance. The saving depends on
the data: short prompts with long answers save little, and the mask is [B, 1, M, M].
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from trl import DPOTrainer

logger = logging.getLogger(__name__)

# Attention implementations that take a custom 4D mask as-is: SDPA a boolean one, eager an additive one.
_MASKS = ("sdpa", "eager")
_PLAIN_KWARGS = ("use_cache", "return_dict")


@dataclass
class PairLayout:
    """One row per pair, and where each of TRL's 2B x L positions is found in it."""

    input_ids: torch.Tensor  # [B, M]
    position_ids: torch.Tensor  # [B, M]
    keep: torch.Tensor  # [B, 1, M, M], True where a query may attend a key
    gather: torch.Tensor  # [2B * L] index into the [B * M + 1] flattened rows (the last one is zeros)


def pair_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PairLayout | None:
    """The shared layout of a [chosen; rejected] batch, or None when the batch is not one."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    b = rows // 2
    device = input_ids.device
    span = torch.arange(length, device=device)
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), span[None] < lengths[:, None]):
        return None  # not left-aligned: positions would not line up
    lc, lr = lengths[:b], lengths[b:]
    same = (input_ids[:b] == input_ids[b:]) & (span[None] < torch.minimum(lc, lr)[:, None])
    shared = same.long().cumprod(1).sum(1)  # the common prefix of each pair
    n = lc + lr - shared
    width = int(n.max())

    j = torch.arange(width, device=device)[None]  # slot in the shared row
    in_chosen = j < lc[:, None]
    valid = j < n[:, None]
    src_pos = torch.where(in_chosen, j, shared[:, None] + j - lc[:, None]).clamp(0, length - 1)
    pair = torch.arange(b, device=device)[:, None]
    src_row = torch.where(in_chosen, pair, pair + b)
    ids = torch.where(valid, input_ids[src_row, src_pos], input_ids[0, 0])
    position_ids = torch.where(valid, src_pos, 0)

    query, key = j[..., :, None], j[..., None, :]  # [1, M, 1] and [1, 1, M]
    chosen_tail = (key >= shared[:, None, None]) & (key < lc[:, None, None])
    keep = (key <= query) & valid[:, None, :] & ~((query >= lc[:, None, None]) & chosen_tail)
    keep[..., 0] |= ~valid  # padding queries see slot 0, so no softmax row is empty
    keep = keep[:, None]

    t = span[None]
    chosen_at = pair * width + t
    rejected_at = pair * width + torch.where(t < shared[:, None], t, lc[:, None] + t - shared[:, None])
    blank = b * width
    gather = torch.cat(
        [
            torch.where(t < lc[:, None], chosen_at, blank),
            torch.where(t < lr[:, None], rejected_at, blank),
        ]
    ).reshape(-1)
    return PairLayout(ids, position_ids, keep, gather)


# Decoders whose every layer is attention with positions from position_ids (RoPE), checked to take a
# custom 4D mask. Hybrid and recurrent layers (LFM2, Jamba) and ALiBi (MPT, BLOOM) would not be exact.
DECODERS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2", "smollm3"}
)


def shareable(model: Any, max_length: int | None) -> str | None:
    """Why a model cannot share prefixes exactly, or None when it can."""
    config = model.config.get_text_config()
    if config is not model.config:
        return "a multimodal model's backbone takes more than token ids"
    if config.model_type not in DECODERS:
        return f"model type {config.model_type!r} is not a plain RoPE decoder ({', '.join(sorted(DECODERS))})"
    if getattr(config, "output_router_logits", False):
        return "a mixture-of-experts model's router logits are per row"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASKS:
        return f"attention implementation {impl!r} takes no custom mask (only {', '.join(_MASKS)})"
    # A custom mask replaces the window; that is exact while no sequence is longer than the window.
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and (max_length is None or window < max_length):
        return f"its sliding window ({window} tokens) is shorter than dpo.max_length ({max_length})"
    return None


class PromptSharing:
    """Wraps a backbone's forward so that, while on, [chosen; rejected] batches run shared."""

    def __init__(self, backbone: torch.nn.Module, attn_implementation: str):
        self.original = backbone.forward
        self.additive = attn_implementation == "eager"
        self.active = False
        self.shared = self.unshared = 0  # batches run while on, each way
        backbone.forward = self._forward  # the instance only; TRL's fused LM head calls the backbone

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _forward(self, input_ids=None, attention_mask=None, **kwargs):
        if not self.active:
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # PEFT passes inputs_embeds, output_attentions and the like as None: only a set one stops sharing.
        extra = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k not in _PLAIN_KWARGS)
        two_d = input_ids is not None and attention_mask is not None and attention_mask.dim() == 2
        layout = pair_layout(input_ids, attention_mask) if two_d and not extra else None
        if layout is None:
            if not self.unshared:
                why = f"it came with {', '.join(extra)}" if extra else "it is not [chosen; rejected], left-aligned"
                logger.warning("A DPO batch ran its two rows separately: %s", why)
            self.unshared += 1
            return self.original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.shared += 1
        out = self.original(
            input_ids=layout.input_ids,
            attention_mask=self._mask(layout.keep),
            position_ids=layout.position_ids,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
        hidden = out.last_hidden_state
        flat = torch.cat([hidden.reshape(-1, hidden.shape[-1]), hidden.new_zeros(1, hidden.shape[-1])])
        out.last_hidden_state = flat[layout.gather].reshape(*input_ids.shape, hidden.shape[-1])
        return out

    def _mask(self, keep: torch.Tensor) -> torch.Tensor:
        if not self.additive:
            return keep
        device = keep.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def backbone_of(model: Any) -> torch.nn.Module:
    """The decoder stack TRL's fused LM head calls (`base_model` of the causal LM, under any PEFT wrapper)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model


class SharedPromptDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, with each pair's common prefix run once. slmops trains LoRA, so the reference
    pass is the same model with its adapter off (or the frozen "ref" adapter), through the same backbone."""

    def __init__(self, model: Any, *args: Any, share_prompt: bool = True, **kwargs: Any):
        if not share_prompt:
            why_not: str | None = "dpo.share_prompt is off"
        elif kwargs.get("ref_model") is not None:
            why_not = "a separate reference model is not wrapped"
        else:
            why_not = shareable(model, getattr(kwargs.get("args"), "max_length", None))
        self._sharing: PromptSharing | None = None
        if why_not:
            logger.info("DPO runs each pair's two rows separately: %s", why_not)
        else:
            self._sharing = PromptSharing(backbone_of(model), model.config._attn_implementation)
            logger.info("DPO runs each pair's common prefix once")
        super().__init__(model, *args, **kwargs)

    def _shared(self):
        return self._sharing.on() if self._sharing else contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._shared():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        with self._shared():
            return super().compute_ref_log_probs(model, inputs)
