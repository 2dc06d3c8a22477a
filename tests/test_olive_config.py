import copy
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_recipe
from slmops.core.errors import RecipeError, RunError
from slmops.core.workflows import package_config
from slmops.training.data import DataSource
from slmops.training.olive_config import (
    Sources,
    drifted_configs,
    golden_text,
    render_finetune,
    render_portable,
    validate,
)
from slmops.training.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_golden_config_matches_recipe(path):
    golden = REPO / "olive_configs" / f"{path.stem}.json"
    assert golden.is_file(), f"missing {golden}; run python scripts/render_olive_configs.py"
    assert golden.read_text() == golden_text(path), f"{golden.name} drifted; run python scripts/render_olive_configs.py"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_golden_config_is_accepted_by_olive(path):
    validate(json.loads((REPO / "olive_configs" / f"{path.stem}.json").read_text()))


def test_drift_is_detected(tmp_path):
    recipes, configs = tmp_path / "recipes", tmp_path / "configs"
    recipes.mkdir()
    configs.mkdir()
    write_recipe(recipes / "a.yaml", "data:\n  file: x.jsonl\n")
    (configs / "a.json").write_text(golden_text(recipes / "a.yaml"))
    assert drifted_configs(recipes, configs) == []
    write_recipe(recipes / "a.yaml", "data:\n  file: x.jsonl\nlora:\n  r: 4\n")
    (configs / "orphan.json").write_text("{}")
    assert drifted_configs(recipes, configs) == ["a", "orphan"]


def _recipe(tmp_path, extra=""):
    return load_recipe(str(write_recipe(tmp_path / "r.yaml", "data:\n  file: d.jsonl\n" + extra)))


def test_render_lora_pass(tmp_path):
    r = _recipe(tmp_path, "lora:\n  r: 8\n  alpha: 16\n  target_modules: [q_proj]\ntraining:\n  max_steps: 7\n")
    src = DataSource(path="/data/d.jsonl", sha256="ab" * 32)
    config = render_finetune(r, "/models/m", Sources(sft=src), work_dir="/w")
    sft = config["passes"]["sft"]
    assert sft["type"] == "LoRA"
    assert (sft["r"], sft["alpha"], sft["target_modules"]) == (8, 16, ["q_proj"])
    assert sft["training_args"]["max_steps"] == 7
    assert sft["training_args"]["save_steps"] == 7
    assert sft["training_args"]["output_dir"] == "/w/checkpoints"
    assert "eval_data_config" not in sft and len(config["data_configs"]) == 1
    load = config["data_configs"][0]["load_dataset_config"]["params"]
    assert load["source"] == {"path": "/data/d.jsonl", "sha256": "ab" * 32, "split": "train"}
    assert config["data_configs"][0]["pre_process_data_config"]["params"]["model_name"] == "/models/m"
    assert config["input_model"]["model_path"] == "/models/m"
    assert config["cache_dir"] == "/w/olive-cache"


def test_render_is_pure(tmp_path):
    r = _recipe(tmp_path)
    src = DataSource(path="/d.jsonl", sha256="00")
    first = render_finetune(r, "/m", Sources(sft=src))
    assert render_finetune(r, "/m", Sources(sft=src)) == first
    before = copy.deepcopy(r.model_dump())
    render_finetune(r, "/m", Sources(sft=src))
    assert r.model_dump() == before


def _differences(a, b, where=()) -> list[tuple]:
    """The paths (keys and list indexes) at which two rendered configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        missing = object()
        return [
            p
            for k in sorted(a.keys() | b.keys(), key=str)
            for p in _differences(a.get(k, missing), b.get(k, missing), where + (k,))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _differences(x, y, where + (i,))]
    return [] if a == b else [where]


def test_data_hash_is_in_the_config(tmp_path):
    # Olive's cache key comes from the config: a changed file must change it, and nothing else may.
    r = _recipe(tmp_path, "dpo:\n  data:\n    file: p.jsonl\n")
    a_hash, b_hash, dpo_hash = "a1" * 32, "b2" * 32, "c3" * 32
    dpo = DataSource(path="/p.jsonl", sha256=dpo_hash)
    a = render_finetune(r, "/m", Sources(sft=DataSource(path="/d.jsonl", sha256=a_hash), dpo=dpo))
    b = render_finetune(r, "/m", Sources(sft=DataSource(path="/d.jsonl", sha256=b_hash), dpo=dpo))
    train, dpo_train = a["data_configs"][0], a["data_configs"][1]
    assert (train["name"], dpo_train["name"]) == ("train_data", "dpo_train_data")
    assert train["load_dataset_config"]["params"]["source"] == {"path": "/d.jsonl", "sha256": a_hash, "split": "train"}
    assert b["data_configs"][0]["load_dataset_config"]["params"]["source"]["sha256"] == b_hash
    assert dpo_train["load_dataset_config"]["params"]["source"]["sha256"] == dpo_hash  # each stage its own file's
    assert _differences(a, b) == [("data_configs", 0, "load_dataset_config", "params", "source", "sha256")]
    assert json.dumps(a).count(a_hash) == 1 and a_hash not in json.dumps(b)


def test_render_qlora_and_eval(tmp_path):
    r = _recipe(tmp_path, "  eval_split: 0.2\nmethod: qlora\nqlora:\n  quant_type: fp4\n")
    config = render_finetune(r, "/m", Sources(sft=DataSource(path="/d.jsonl")))
    sft = config["passes"]["sft"]
    assert sft["type"] == "SlmopsQLoRA"
    assert (sft["quant_type"], sft["double_quant"], sft["compute_dtype"]) == ("fp4", True, "bfloat16")
    assert sft["eval_data_config"] == "eval_data"
    parts = [d["load_dataset_config"]["params"]["part"] for d in config["data_configs"]]
    assert parts == ["train", "eval"]
    assert sft["training_args"]["eval_on_start"] is True


def test_portable_render_uses_hub_ids(tmp_path):
    r = _recipe(tmp_path, "  dataset: org/ds\n")
    config = render_portable(r)
    assert config["input_model"]["model_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["data_configs"][0]["load_dataset_config"]["params"]["source"] == {
        "dataset": "org/ds",
        "file": "d.jsonl",
        "split": "train",
    }


def test_olive_rejects_a_bad_pass_parameter(tmp_path):
    config = render_portable(_recipe(tmp_path))
    config["passes"]["sft"]["r"] = "sixteen"
    with pytest.raises(RunError, match=r"^Olive rejected pass 'sft' \(LoRA\): r: Input should be a valid integer"):
        validate(config)


def test_package_config_keeps_olive_passes():
    passes = package_config()["passes"]
    assert {"LoRA", "QLoRA", "ModelBuilder", "ExtractAdapters"} <= set(passes)


def test_render_sft_then_dpo_chain(tmp_path):
    r = _recipe(tmp_path, "dpo:\n  data:\n    file: p.jsonl\n    eval_split: 0.2\n  beta: 0.2\n  max_steps: 5\n")
    sources = Sources(sft=DataSource(path="/d.jsonl"), dpo=DataSource(path="/p.jsonl", sha256="cc"))
    config = render_finetune(r, "/m", sources, work_dir="/w")
    assert [(name, p["type"]) for name, p in config["passes"].items()] == [("sft", "LoRA"), ("dpo", "DPO")]
    dpo = config["passes"]["dpo"]
    assert (dpo["beta"], dpo["max_steps"], dpo["r"]) == (0.2, 5, 16)
    assert (dpo["train_data_config"], dpo["eval_data_config"]) == ("dpo_train_data", "dpo_eval_data")
    assert dpo["output_dir"] == "/w/dpo-checkpoints"
    names = [d["name"] for d in config["data_configs"]]
    assert names == ["train_data", "dpo_train_data", "dpo_eval_data"]
    assert config["data_configs"][1]["load_dataset_config"]["params"]["source"] == {
        "path": "/p.jsonl",
        "sha256": "cc",
        "split": "train",
    }
    validate(config)


def test_dpo_alone_has_no_sft_pass(tmp_path):
    r = load_recipe(str(write_recipe(tmp_path / "r.yaml", "dpo:\n  data:\n    file: p.jsonl\n")))
    config = render_portable(r)
    assert list(config["passes"]) == ["dpo"]
    assert config["passes"]["dpo"]["quantization"] is None


def test_olive_systems_render_and_validate(tmp_path):
    """A recipe's `system` block becomes the workflow's host and target, checked by Olive (dry run)."""
    docker = _recipe(tmp_path)
    docker.system.type, docker.system.config = (
        "Docker",
        {"image_name": "slmops:latest", "dockerfile": "Dockerfile", "build_context_path": str(tmp_path)},
    )
    config = render_portable(docker)
    assert config["host"] == config["target"] == "docker"
    assert config["systems"] == {"docker": {"type": "Docker", "config": docker.system.config}}
    validate(config)

    env = _recipe(tmp_path)
    env.system.type, env.system.config = "PythonEnvironment", {"python_environment_path": str(tmp_path / "none")}
    with pytest.raises(RunError, match="Olive rejected the workflow config"):
        validate(render_portable(env))
    env.system.config = {"python_environment_path": str(Path(sys.executable).parent)}
    validate(render_portable(env))

    with pytest.raises(RecipeError, match="olive-ai 0.13 has no AzureML system"):
        load_recipe(str(write_recipe(tmp_path / "aml.yaml", "data:\n  file: d.jsonl\nsystem:\n  type: AzureML\n")))
