"""Data-parallel fine-tuning under accelerate: 2 CPU processes (gloo) against 1 with the same global batch."""

import json
from pathlib import Path

import pytest

from conftest import PREFERENCE_DATA, SFT_DATA, write_recipe
from slmops.core.errors import RecipeError, RunError
from slmops.training.finetune import finetune
from slmops.training.recipe import DistributedSection, load_recipe

# Same examples per step, the same initial adapter and (SFT) the same number of trained tokens in every
# example: the curves differ only by the order of floating-point sums across processes. Measured: <= 2e-4
# (SFT), 0 (DPO). With unequal token counts per rank, 2 processes average per-rank mean losses, which is not
# the token mean one process takes (measured 4.4e-3 apart on the fixture rows at max_seq_len 64).
LOSS_TOLERANCE = 1e-3
SFT_SEQ_LEN = 26  # every fixture answer is cut to 13 tokens: the equal-token-count premise above


def _recipe(tmp_path: Path, model: Path, body: str, name: str):
    head = f"model:\n  name: {model}\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n"
    return load_recipe(str(write_recipe(tmp_path / f"{name}.yaml", head + body)))


SFT = f"""
data:
  file: {SFT_DATA}
  max_samples: 32
  max_seq_len: {SFT_SEQ_LEN}
training:
  max_steps: 6
  batch_size: {{batch}}
  learning_rate: 1.0e-2
  dtype: float32
"""

DPO = f"""
dpo:
  data:
    file: {PREFERENCE_DATA}
    max_samples: 32
  max_length: 64
  max_steps: 4
  batch_size: {{batch}}
  learning_rate: 1.0e-2
  dtype: float32
"""


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in e]


def _trained_tokens(recipe, model: Path) -> list[int]:
    from transformers import AutoTokenizer

    from slmops.training import data

    train, _ = data.load_splits(data.locate(recipe.data.file, None), "sft", max_samples=recipe.data.max_samples)
    features = data.tokenize_sft(train, AutoTokenizer.from_pretrained(model), recipe.data.max_seq_len)
    return [sum(label != data.IGNORE_INDEX for label in f["labels"]) for f in features]


def _adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # accelerate launches 2 processes, then 1 more run
@pytest.mark.parametrize("stage, body", [("sft", SFT), ("dpo", DPO)])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model, stage, body):
    one = _recipe(tmp_path, tiny_model, body.format(batch=4), "one")
    if stage == "sft":
        assert len(set(_trained_tokens(one, tiny_model))) == 1, "the premise: equal trained tokens per example"
    two = _recipe(tmp_path, tiny_model, body.format(batch=2), "two")
    two.distributed.num_processes = 2
    finetune(one, tmp_path / "one")
    result = finetune(two, tmp_path / "two")

    single, parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(parallel) == result.stages[stage].steps  # each step logged once, by rank 0
    assert max(abs(a - b) for a, b in zip(single, parallel)) <= LOSS_TOLERANCE, (single, parallel)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    # Adam moves each weight up to lr (1e-2) per step, however small its gradient, so summation-order
    # noise in near-zero gradients shows in single weights: less than one step apart after all steps.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2
    # One adapter, written once, in the output; the other rank's scratch folder is gone.
    out = tmp_path / "two"
    assert [p.relative_to(out) for p in out.rglob("adapter_model.safetensors")] == [
        Path("adapter/adapter_model.safetensors")
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "olive_config.json",
        "recipe.yaml",
        "run.json",
        "training_log.jsonl",
    ]
    assert not list(tmp_path.glob(".slmops-*"))


@pytest.mark.slow  # accelerate launches 2 processes
def test_a_failing_rank_is_one_error(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text(SFT_DATA.read_text())
    recipe = _recipe(tmp_path, tiny_model, SFT.format(batch=2).replace(str(SFT_DATA), str(data)), "bad")
    recipe.distributed.num_processes = 2
    import slmops.training.finetune as finetune_mod

    real = finetune_mod.validate  # the last check before training starts (Olive validates the config)

    def validate_then_edit(config):  # the data changes after planning: every rank refuses it
        real(config)
        data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])

    monkeypatch.setattr(finetune_mod, "validate", validate_then_edit)
    with pytest.raises(RunError) as err:
        finetune(recipe, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and ("distributed training failed" in message or "without producing" in message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".slmops-*"))


def test_accelerate_config_file_is_passed_through(tmp_path):
    from slmops.training.distributed import launch_command

    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    cmd = launch_command(
        tmp_path / "c.json", DistributedSection(num_processes=8, strategy="fsdp", config_file=str(config)), 29600
    )
    assert cmd[cmd.index("--config_file") + 1] == str(config.resolve())
    assert cmd[cmd.index("--num_processes") + 1] == "8" and "--multi_gpu" not in cmd
    plain = launch_command(tmp_path / "c.json", DistributedSection(num_processes=2), 29600)
    assert "--multi_gpu" in plain and plain[-3:] == ["-m", "slmops.training.distributed", str(tmp_path / "c.json")]


def test_bad_distributed_settings(tmp_path, tiny_model):
    with pytest.raises(RecipeError, match="strategy deepspeed needs config_file"):
        _recipe(tmp_path, tiny_model, SFT.format(batch=2) + "distributed:\n  strategy: deepspeed\n", "ds")
    recipe = _recipe(
        tmp_path,
        tiny_model,
        SFT.format(batch=2) + "distributed:\n  num_processes: 2\n  strategy: fsdp\n  config_file: /nowhere/fsdp.yaml\n",
        "fsdp",
    )
    with pytest.raises(RunError, match="config_file /nowhere/fsdp.yaml not found"):
        finetune(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".slmops-*"))
