"""Every shipped recipe, run for one step through its own Olive config on a tiny random model of its
architecture (with its family's chat template, test_architectures.FAMILIES), with synthetic rows in the
recipe's own data layout (the hub is not reachable here); then its export, dry-run.

What the hardware here cannot run is changed and said so: fp16 mixed precision needs a GPU (bf16 here).
"""

import json
from pathlib import Path
from string import Formatter

import pytest
from click.testing import CliRunner

from conftest import REPO
from slmops.cli import cli
from slmops.shipping.export import TARGETS
from slmops.training.finetune import finetune
from slmops.training.recipe import load_recipe
from test_architectures import FAMILIES, family_model

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


# hub id fragment -> its family (the first that matches); anything else is a Llama
FAMILY_OF = (("qwen3", "qwen3"), ("qwen", "qwen2"), ("phi-", "phi3"), ("gemma-2", "gemma2"), ("mistral", "mistral"))


def architecture(model_name: str) -> str:
    name = model_name.lower()
    return next((family for part, family in FAMILY_OF if part in name), "llama")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {name: family_model(family, tmp_path_factory.mktemp(name)) for name, family in FAMILIES.items()}


def sft_row(section, i: int) -> dict:
    """One row in the layout the recipe's data section reads (after its column renames)."""
    if section.template is not None:
        row = {}
        for text in (section.template.prompt, section.template.completion):
            for _, field, _, _ in Formatter().parse(text):
                if field:
                    names = section.template.value_names.get(field)
                    row[field] = list(names)[i % len(names)] if names else f"words number {i} about the sea"
        return row
    fmt = section.format
    if fmt == "messages":
        return {
            "conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]
        }
    if fmt == "text":
        return {"text": f"<s>[INST] question {i} [/INST] answer {i} </s>"}
    if fmt == "input_output":
        return {"input": f"question {i}?", "output": f"answer {i}."}
    row = {"prompt": f"write code {i}", "completion": f"print({i})"}
    return {section.columns.get(k, k): v for k, v in row.items()}


def preference_row(section, i: int) -> dict:
    row = {"prompt": f"question {i}?", "chosen": f"a kind answer {i}.", "rejected": f"a rude answer {i}!"}
    return {section.columns.get(k, k): v for k, v in row.items()}


def _local(section, tmp_path: Path, name: str, make_row) -> None:
    """Point a data section at 40 synthetic local rows, keeping its kind of split and hold-out."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(make_row(section, i)) + "\n" for i in range(40)))
    section.file, section.dataset = str(path), None
    sliced = isinstance(section.eval_split, str)
    section.split = "train[:32]" if "[" in section.split or sliced else "train"
    if sliced:
        section.eval_split = "train[32:40]"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step_on_its_architecture(path, tmp_path, tiny_models):
    recipe = load_recipe(str(path))
    recipe.model.name = str(tiny_models[architecture(load_recipe(str(path)).model.name)])
    if recipe.data:
        _local(recipe.data, tmp_path, "sft", sft_row)
        recipe.data.max_seq_len = 64
        t = recipe.training
        t.max_steps, t.batch_size, t.gradient_accumulation_steps, t.save_steps, t.logging_steps = 1, 2, 1, None, 1
        t.dtype = "bfloat16" if t.dtype == "float16" else t.dtype  # fp16 mixed precision needs a GPU
    if recipe.dpo:
        _local(recipe.dpo.data, tmp_path, "dpo", preference_row)
        d = recipe.dpo
        # 192: room for the longest family template's own tokens (Llama 3.2's dated system header)
        d.max_steps, d.batch_size, d.gradient_accumulation_steps, d.max_length, d.save_steps = 1, 2, 1, 192, None
        d.data.eval_max_samples = 2
        d.dtype = "bfloat16" if d.dtype == "float16" else d.dtype
    result = finetune(recipe, tmp_path / "out")

    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert [result.stages[s].steps for s in recipe.stages] == [1] * len(recipe.stages)
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    golden = json.loads((REPO / "olive_configs" / f"{path.stem}.json").read_text())
    assert {name: p["type"] for name, p in config["passes"].items()} == {
        name: p["type"] for name, p in golden["passes"].items()
    }
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(recipe.lora.target_modules) and adapter["r"] == recipe.lora.r

    exported = CliRunner().invoke(
        cli,
        [
            "export",
            "--recipe",
            str(path),
            "-m",
            recipe.model.name,
            "-a",
            f"a={tmp_path / 'out'}",
            "-o",
            str(tmp_path / "bundle"),
            "--dry-run",
            *(["--merge", "a"] if not TARGETS[recipe.export.target].adapters else []),
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "bundle" / "olive_config.json").is_file()
