import pytest

from conftest import REPO, write_recipe
from slmops.core.errors import RecipeError
from slmops.training.recipe import UNSET, find_recipe, load_recipe, parse_override, recipe_to_yaml

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
MINIMAL = "data:\n  file: h4rmony_alpaca.jsonl\n"


def test_shipped_recipes_exist():
    names = {p.stem for p in SHIPPED}
    assert {"smollm2-135m-sft-h4rmony", "smollm2-135m-qlora-h4rmony"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    sections = [s for s in (recipe.data, recipe.dpo.data if recipe.dpo else None) if s is not None]
    assert sections and all(s.file or s.dataset for s in sections)


def test_defaults_fill_in(tmp_path):
    r = load_recipe(str(write_recipe(tmp_path / "r.yaml", MINIMAL)))
    assert r.model.name == "smollm2-135m-instruct"
    assert r.method == "lora"
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.training.max_steps == -1
    assert r.name == "r"


def test_precedence_defaults_recipe_flags_set(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL + "lora:\n  r: 8\n  alpha: 16\nmodel:\n  name: ./m\n")
    r = load_recipe(str(path), flags={"model.name": "other", "lora.r": 4}, sets=["lora.r=32", "training.max_steps=7"])
    assert r.model.name == "other"  # flag beats recipe
    assert r.lora.r == 32  # --set beats flag
    assert r.lora.alpha == 16  # recipe beats default
    assert r.training.max_steps == 7


def test_flag_none_means_not_given_and_unset_clears(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  dataset: org/ds\n  file: a.jsonl\n")
    assert load_recipe(str(path), flags={"data.file": None}).data.file == "a.jsonl"
    assert load_recipe(str(path), flags={"data.file": UNSET}).data.file is None


def test_set_values_are_parsed_as_yaml(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL)
    r = load_recipe(
        str(path), sets=["lora.target_modules=[q_proj, k_proj]", "training.learning_rate=1e-4", "data.dedupe=false"]
    )
    assert r.lora.target_modules == ["q_proj", "k_proj"]
    assert r.training.learning_rate == pytest.approx(1e-4)
    assert r.data.dedupe is False


def test_unknown_key_is_named_with_known_keys(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL + "lora:\n  rank: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert str(err.value) == f"recipe {path}: lora.rank: unknown key (known keys: r, alpha, dropout, target_modules)"


def test_unknown_top_level_section(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL + "trainer:\n  steps: 3\n")
    with pytest.raises(RecipeError, match=r"trainer: unknown key \(known keys: name, description, method, model"):
        load_recipe(str(path))


def test_all_problems_reported_at_once(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL + "method: full\nlora:\n  r: 0\ntraining:\n  batch_size: two\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert "method: Input should be 'lora' or 'qlora'" in message
    assert "lora.r: Input should be greater than or equal to 1" in message
    assert "training.batch_size: Input should be a valid integer" in message
    assert "\n" not in message


def test_data_needs_a_source(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  format: alpaca\n")
    with pytest.raises(RecipeError, match="data: Value error, needs `file`"):
        load_recipe(str(path))


def test_eval_split_and_eval_file_conflict(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL + "  eval_split: 0.1\n  eval_file: e.jsonl\n")
    with pytest.raises(RecipeError, match="set either eval_split or eval_file, not both"):
        load_recipe(str(path))


def test_nothing_to_train(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "method: lora\n")
    with pytest.raises(RecipeError, match="nothing to train: add a `data` section .* and/or a `dpo` section"):
        load_recipe(str(path))


def test_dpo_section_validation(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "dpo:\n  data:\n    file: p.jsonl\n  beta: 0\n  loss: sigmoid\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert "dpo.beta: Input should be greater than 0" in str(err.value)
    assert "dpo.loss: unknown key (known keys: data, beta, loss_type, max_length" in str(err.value)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("data: [unclosed\n", "invalid YAML at line 2, column 1"),
        ("- just\n- a list\n", "expected a mapping of sections"),
        ("", "expected a mapping of sections"),
    ],
)
def test_bad_yaml(tmp_path, body, expected):
    path = write_recipe(tmp_path / "r.yaml", body)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(str(path))


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"data:\n  file: \xff\xfe.jsonl\n")
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(str(path))


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe 'nope.yaml' not found"):
        find_recipe("nope.yaml")


def test_shipped_recipe_found_by_name():
    assert find_recipe("smollm2-135m-sft-h4rmony").name == "smollm2-135m-sft-h4rmony.yaml"


@pytest.mark.parametrize("item", ["lora.r", "=3", "lora..r=3", ""])
def test_malformed_set(item):
    with pytest.raises(RecipeError, match="expected key=value with a dotted key"):
        parse_override(item)


def test_set_into_a_scalar_is_refused(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(RecipeError, match="'data.file' is not a section"):
        load_recipe(str(path), sets=["data.file.x=1"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(str(write_recipe(tmp_path / "r.yaml", MINIMAL)), sets=["lora.r=8"])
    again = write_recipe(tmp_path / "again.yaml", recipe_to_yaml(r))
    assert load_recipe(str(again)).model_dump() == r.model_dump()


def test_unknown_key_in_cli_set(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(RecipeError, match=r"training.max_step: unknown key \(known keys: max_steps"):
        load_recipe(str(path), sets=["training.max_step=3"])


def test_recipe_dir_lookup_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    write_recipe(tmp_path / "recipes" / "mine.yaml", MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert find_recipe("mine").resolve() == (tmp_path / "recipes" / "mine.yaml").resolve()
