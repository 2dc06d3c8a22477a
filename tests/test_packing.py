"""`training.packing`: examples packed into rows, each attending only to itself."""

import json
import math

import torch

from slmops.training import data
from slmops.training.passes.packing import collate_packed

EXAMPLES = [
    {"prompt": [{"role": "user", "content": "plant trees"}], "completion": "yes, many trees and more"},
    {"prompt": [{"role": "user", "content": "which ones"}], "completion": "oaks"},
    {"prompt": None, "completion": "plain text trains every token"},
    {"prompt": [{"role": "user", "content": "and then " * 5}], "completion": "wait a while"},
]


def _tensors(row: dict) -> dict:
    return {k: torch.tensor(v) for k, v in row.items()}


def test_pack_fits_rows_best_first_and_keeps_every_token():
    features = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 4, 2, 6], start=1)]
    rows = data.pack(features, 8)
    # largest first, each into the fullest row it fits: 6+2, 5+3, 4
    assert [r["input_ids"] for r in rows] == [[5] * 6 + [4] * 2, [1] * 5 + [2] * 3, [3] * 4]
    assert [r["position_ids"] for r in rows] == [[*range(6), *range(2)], [*range(5), *range(3)], [*range(4)]]
    # each example's first token is no target: in a row it would follow the example before it
    assert rows[0]["labels"] == [-100, 5, 5, 5, 5, 5, -100, 4]


def test_a_packed_examples_loss_equals_its_loss_alone(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    features = data.tokenize_sft(EXAMPLES, tok, 512)
    (row,) = data.pack(features, 512)
    batch = collate_packed([_tensors(row)], tok)
    assert "attention_mask" not in batch
    model.train()  # as the trainer runs it: a model in training mode makes a KV cache unless told not to
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        order = sorted(features, key=lambda f: len(f["input_ids"]), reverse=True)  # how pack() placed them
        for feature in order:
            n = len(feature["input_ids"])
            alone = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
            targets = torch.tensor(feature["input_ids"][1:])
            loss_alone = torch.nn.functional.cross_entropy(alone[:-1], targets, reduction="none")
            loss_packed = torch.nn.functional.cross_entropy(packed[start : start + n - 1], targets, reduction="none")
            assert (loss_alone - loss_packed).abs().max() < 1e-4
            start += n


def test_packing_is_honoured_by_the_olive_pass(tiny_model, tmp_path, monkeypatch):
    from conftest import write_jsonl, write_recipe
    from slmops.training.finetune import finetune
    from slmops.training.passes.packing import SlmopsLoRA
    from slmops.training.recipe import load_recipe

    seen = []

    def watch(batch, tokenizer):
        out = collate_packed(batch, tokenizer)
        seen.append((sorted(out), out["input_ids"].shape[1]))
        return out

    monkeypatch.setattr(SlmopsLoRA, "collate_batch", staticmethod(watch))

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(12)
    ]
    body = (
        f"model:\n  name: {tiny_model}\ndata:\n  file: {write_jsonl(tmp_path / 'd.jsonl', rows)}\n  max_seq_len: 64\n"
        "lora:\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
        "training:\n  max_steps: 2\n  batch_size: 2\n  packing: true\n  dtype: float32\n  logging_steps: 1\n"
    )
    result = finetune(load_recipe(str(write_recipe(tmp_path / "r.yaml", body))), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    assert config["passes"]["sft"]["type"] == "SlmopsLoRA"
    assert config["data_configs"][0]["pre_process_data_config"]["params"]["packing"] is True
    assert result.stages["sft"].steps == 2 and math.isfinite(result.stages["sft"].final_loss)
    keys, width = seen[0]
    assert keys == ["input_ids", "labels", "position_ids", "use_cache"] and 32 < width <= 64  # rows of several examples
