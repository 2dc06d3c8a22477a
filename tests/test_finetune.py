"""Real fine-tunes through Olive's LoRA pass, on a tiny random model (seconds each)."""

import json
from pathlib import Path

import pytest

from conftest import SFT_DATA, write_jsonl, write_recipe
from slmops.core.errors import RunError
from slmops.core.files import PARTIAL_PREFIX
from slmops.training.finetune import finetune
from slmops.training.recipe import load_recipe


def tiny_recipe(tmp_path: Path, model: Path, data: str = str(SFT_DATA), extra: str = "") -> object:
    body = f"""
model:
  name: {model}
data:
  file: {data}
  max_samples: 16
  max_seq_len: 64
lora:
  r: 4
  alpha: 8
  target_modules: [q_proj, v_proj]
training:
  max_steps: 3
  batch_size: 2
  learning_rate: 1.0e-2
  dtype: float32
{extra}"""
    return load_recipe(str(write_recipe(tmp_path / "tiny.yaml", body)))


def _lora_b_weights(adapter: Path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k}


def test_finetune_through_olive(tmp_path, tiny_model, no_network):
    recipe = tiny_recipe(tmp_path, tiny_model, extra="  logging_steps: 1\n")
    recipe.data.eval_split = 0.25
    out = tmp_path / "out"
    result = finetune(recipe, out)

    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "olive_config.json",
        "recipe.yaml",
        "run.json",
        "training_log.jsonl",
    ]
    assert (out / "adapter" / "adapter_config.json").is_file()
    weights = [p for p in out.rglob("*.safetensors")]
    assert weights == [out / "adapter" / "adapter_model.safetensors"]  # no copy of the base model
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
    assert [e["step"] for e in log if "eval_loss" in e] == [0, 3]
    sft = result.stages["sft"]
    assert sft.steps == 3 and sft.eval_loss_start is not None and sft.eval_loss is not None
    config = json.loads((out / "olive_config.json").read_text())
    assert config["passes"]["sft"]["type"] == "LoRA"
    assert config["input_model"]["model_path"] == str(tiny_model.resolve())
    assert json.loads((out / "run.json").read_text())["data"]["sft"]["sha256"]
    assert any(w.abs().sum() > 0 for w in _lora_b_weights(out / "adapter").values())  # B starts at zero
    assert not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))
    assert no_network == []


def test_adapter_loads_in_peft_and_changes_output(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    finetune(tiny_recipe(tmp_path, tiny_model), tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_data_smaller_than_one_sequence_still_trains(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Name a tree.", "output": "An oak."}])
    recipe = tiny_recipe(tmp_path, tiny_model, data=str(data))
    recipe.data.max_seq_len = 512
    result = finetune(recipe, tmp_path / "out")
    assert result.counts["sft"] == (1, 0)
    assert result.stages["sft"].steps == 3


def test_changed_data_never_returns_a_stale_adapter(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"input": f"q{i}", "output": "forests are good"} for i in range(6)])
    finetune(tiny_recipe(tmp_path, tiny_model, data=str(data)), tmp_path / "a")
    write_jsonl(data, [{"input": f"q{i}", "output": "concrete everywhere now"} for i in range(6)])
    finetune(tiny_recipe(tmp_path, tiny_model, data=str(data)), tmp_path / "b")
    a, b = _lora_b_weights(tmp_path / "a" / "adapter"), _lora_b_weights(tmp_path / "b" / "adapter")
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)
    runs = [json.loads((tmp_path / n / "run.json").read_text())["data"]["sft"]["sha256"] for n in "ab"]
    assert runs[0] != runs[1]


def test_dry_run_writes_config_only(tmp_path, tiny_model):
    result = finetune(tiny_recipe(tmp_path, tiny_model), tmp_path / "out", dry_run=True)
    assert result.dry_run and result.adapter_dir is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["olive_config.json", "recipe.yaml", "run.json"]


def test_failure_leaves_no_output(tmp_path, tiny_model, monkeypatch):
    import olive.workflows

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(olive.workflows, "run", broken)
    with pytest.raises(RunError, match=r"^Olive's fine-tune failed \(RuntimeError: boom\); rerun with --verbose"):
        finetune(tiny_recipe(tmp_path, tiny_model), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))


def test_existing_output_is_refused(tmp_path, tiny_model):
    (tmp_path / "out").mkdir()
    with pytest.raises(RunError, match="output folder '.*out' already exists; pass another -o/--output"):
        finetune(tiny_recipe(tmp_path, tiny_model), tmp_path / "out")


def test_qlora_through_olive(tmp_path, tiny_model):
    pytest.importorskip(
        "bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install 'slmops[qlora]')"
    )
    recipe = tiny_recipe(tmp_path, tiny_model)
    recipe.method = "qlora"
    result = finetune(recipe, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "olive_config.json").read_text())["passes"]["sft"]["type"] == "SlmopsQLoRA"
    assert result.stages["sft"].steps == 3
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]  # the recipe's, not every 4-bit linear


def test_qlora_without_bitsandbytes_says_what_to_do(tmp_path, tiny_model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    recipe = tiny_recipe(tmp_path, tiny_model)
    recipe.method = "qlora"
    with pytest.raises(RunError, match=r"method: qlora needs bitsandbytes.*use method: lora \(--set method=lora\)"):
        finetune(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
