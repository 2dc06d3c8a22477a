"""DPO's shared-prefix layout is exact: the same log-probs and gradients as TRL's two rows per pair."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import write_jsonl
from slmops.training.passes.shared_prompt import PromptSharing, backbone_of, pair_layout, shareable
from test_dpo import dpo_block, recipe

VOCAB = 97


def tiny_llama(impl: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config._attn_implementation = impl
    return LlamaForCausalLM(config).eval()


def pair_batch(extra_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] rows, left-aligned and right-padded, with every kind of overlap."""
    g = torch.Generator().manual_seed(1)

    def toks(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    p = [toks(n) for n in (11, 5, 7, 3, 6, 4)]
    same, longer, shorter = toks(5), toks(6), toks(8)
    pairs = [
        (p[0] + [1] + toks(3), p[0] + [2] + toks(8)),  # a prompt and two answers that differ at once
        (p[1] + [7, 8] + toks(3), p[1] + [7, 8] + toks(12)),  # answers that start alike
        (p[2] + [3] + toks(4), p[2] + [4] + toks(4)),  # answers of one length
        (p[3] + longer, p[3] + longer + toks(4)),  # chosen a prefix of rejected
        (p[4] + shorter + toks(3), p[4] + shorter),  # rejected a prefix of chosen
        (p[5] + same, p[5] + same),  # the two sides the same
        ([5] + toks(6), [6] + toks(9)),  # nothing in common
    ]
    rows = [a for a, _ in pairs] + [b for _, b in pairs]
    width = max(map(len, rows)) + extra_padding  # as TRL's pad_to_multiple_of leaves it
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


SHARED = [11, 7, 7, 9, 14, 9, 0]  # each pair's common prefix in pair_batch


def token_logps(model, ids, mask) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    picked = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return picked * mask[:, 1:]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("extra_padding", [0, 5])
def test_shared_layout_gives_the_same_log_probs_and_gradients(impl, extra_padding):
    ids, mask = pair_batch(extra_padding)
    plain_model, shared_model = tiny_llama(impl), tiny_llama(impl)
    sharing = PromptSharing(backbone_of(shared_model), impl)

    plain = token_logps(plain_model, ids, mask)
    with sharing.on():
        shared = token_logps(shared_model, ids, mask)
    assert (sharing.shared, sharing.unshared) == (1, 0)
    assert torch.allclose(plain, shared, atol=1e-5), (plain - shared).abs().max()

    plain.sum().backward()
    shared.sum().backward()  # the shared prompt's gradient is the sum of both rows' use of it
    for (name, a), b in zip(plain_model.named_parameters(), shared_model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name

    # Off, the backbone runs as it is.
    assert torch.equal(token_logps(shared_model, ids, mask), plain.detach())
    assert sharing.shared == 1


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_layout_under_bf16_autocast(impl):
    """As the recipes train: bf16 rounds the two layouts differently, but only within its tolerance."""
    ids, mask = pair_batch()
    model = tiny_llama(impl)
    sharing = PromptSharing(backbone_of(model), impl)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_logps(model, ids, mask)
        with sharing.on():
            shared = token_logps(model, ids, mask)
    assert sharing.shared == 1
    per_answer = (plain - shared).sum(1).abs()
    assert per_answer.max() < 0.05 * plain.sum(1).abs().max(), per_answer


@pytest.mark.parametrize("pairs", [1, 7])
def test_layout_computes_each_common_prefix_once(pairs):
    ids, mask = pair_batch()
    ids, mask = torch.cat([ids[:pairs], ids[7 : 7 + pairs]]), torch.cat([mask[:pairs], mask[7 : 7 + pairs]])
    layout = pair_layout(ids, mask)
    assert layout is not None
    lengths = mask.sum(1)
    shared = torch.tensor(SHARED[:pairs])
    assert layout.input_ids.shape == (pairs, int((lengths[:pairs] + lengths[pairs:] - shared).max()))
    # Every token of TRL's layout is found again where the gather says; padding comes back as the blank row.
    flat = torch.cat([layout.input_ids.reshape(-1), torch.zeros(1, dtype=torch.long)])
    assert torch.equal(flat[layout.gather].reshape(ids.shape), ids * mask)
    # A rejected tail never sees the chosen tail; its positions continue from the shared prefix.
    a, r = int(lengths[0]), int(lengths[pairs])
    assert not layout.keep[0, 0, a:, SHARED[0] : a].any() and layout.keep[0, 0, a:, : SHARED[0]].all()
    assert layout.position_ids[0, a : a + r - SHARED[0]].tolist() == list(range(SHARED[0], r))


@pytest.mark.parametrize(
    "ids, mask",
    [
        (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)),  # an odd batch
        (torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])),  # left padding
    ],
)
def test_what_is_not_a_pair_batch_is_left_alone(ids, mask):
    assert pair_layout(ids, mask) is None
    model = tiny_llama("sdpa")
    sharing = PromptSharing(backbone_of(model), "sdpa")
    with sharing.on():
        model(input_ids=ids, attention_mask=mask)
    assert (sharing.shared, sharing.unshared) == (0, 1)


def test_models_that_cannot_share_exactly_are_named():
    from transformers import Lfm2Config, MixtralConfig, Qwen2VLConfig

    assert shareable(tiny_llama("sdpa"), 64) is None
    flash = tiny_llama("sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # named only: the package is not installed here
    assert "flash_attention_2" in shareable(flash, 64)
    windowed = tiny_llama("sdpa")
    windowed.config.sliding_window = 32
    assert "sliding window (32 tokens) is shorter than dpo.max_length (64)" in shareable(windowed, 64)
    assert shareable(windowed, 32) is None  # no sequence is longer than the window
    assert "sliding window" in shareable(windowed, None)
    for config, why in [
        (Lfm2Config(), "model type 'lfm2' is not a plain RoPE decoder"),  # convolution layers see the whole row
        (MixtralConfig(output_router_logits=True), "model type 'mixtral'"),
        (Qwen2VLConfig(), "multimodal"),
    ]:
        assert why in shareable(SimpleNamespace(config=config), 64)


@pytest.mark.slow
def test_dpo_pass_trains_alike_with_and_without_sharing(tmp_path, tiny_model, caplog, monkeypatch):
    """Through Olive and TRL: the same steps give the same losses and rewards, shared or not."""
    from slmops.training.finetune import finetune

    caplog.set_level(logging.INFO, logger="slmops.training.passes.shared_prompt")
    prompt = "Please tell me about the weather and the sea today."
    pairs = [
        {"prompt": prompt + f" ({i})", "chosen": f"Sunny, calm {i}.", "rejected": f"Rain and a gale {i}!"}
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    sharings = []  # the wrappers the real TRL path made: PEFT's extra kwargs once made every batch fall through
    real_init = PromptSharing.__init__
    monkeypatch.setattr(PromptSharing, "__init__", lambda self, *a: (sharings.append(self), real_init(self, *a))[1])
    logs = {}
    for share in ("true", "false"):
        body = dpo_block(f"  share_prompt: {share}\n").replace(str(__import__("conftest").PREFERENCE_DATA), str(data))
        out = tmp_path / share
        finetune(recipe(tmp_path, tiny_model, body), out)
        log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
        logs[share] = [e[k] for e in log if "rewards/margins" in e for k in ("loss", "rewards/margins")]
    said = [r.getMessage() for r in caplog.records if r.name.endswith("shared_prompt")]
    assert said == [
        "DPO runs each pair's common prefix once",
        "DPO runs each pair's two rows separately: dpo.share_prompt is off",
    ]
    # on: the policy and reference passes of both steps and of the evaluation ran shared, none otherwise
    assert len(sharings) == 1 and (sharings[0].shared, sharings[0].unshared) == (6, 0)
    assert len(logs["true"]) == 4 and logs["true"][-1] != 0
    assert logs["true"] == pytest.approx(logs["false"], abs=1e-4)
