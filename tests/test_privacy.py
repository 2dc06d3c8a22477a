import os

from conftest import write_recipe

from slmops.privacy import go_offline, recipe_needs_hub
from slmops.recipe import load_recipe


def test_offline_switches(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "ORT_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)
    go_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    assert os.environ["OLIVE_DISABLE_TELEMETRY"] == "1"


def test_hub_only_when_named(tmp_path, monkeypatch):
    local = write_recipe(tmp_path / "a.yaml", "data:\n  dataset: org/ds\n  file: h4rmony_alpaca.jsonl\n")
    assert not recipe_needs_hub(load_recipe(str(local)))  # found in SLMOPS_DATA_DIR
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    assert recipe_needs_hub(load_recipe(str(local)))  # not found locally: the hub dataset is needed
    hub_model = write_recipe(tmp_path / "b.yaml", "model:\n  name: org/m\ndata:\n  file: x.jsonl\n")
    assert recipe_needs_hub(load_recipe(str(hub_model)))
