"""The CLI: exit codes and the exact one-line messages a user sees."""

import json

import pytest
from click.testing import CliRunner
from conftest import write_jsonl, write_recipe

from slmops.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout.strip() if result.exit_code == 0 else result.output.strip()


def assert_user_error(code, output, message):
    assert code == 2, output
    assert output == f"Error: {message}"
    assert "Traceback" not in output


def test_help_lists_commands():
    code, out = run("--help")
    assert code == 0
    assert "finetune" in out and "recipes" in out


def test_recipes_list_and_validate():
    code, out = run("recipes", "list")
    assert code == 0
    assert "smollm2-135m-sft-h4rmony" in out and "qlora" in out
    code, out = run("recipes", "validate")
    assert code == 0 and out.count("ok  ") >= 2


def test_recipes_show_applies_set():
    code, out = run("recipes", "show", "smollm2-135m-sft-h4rmony", "--set", "lora.r=4")
    assert code == 0
    assert "  r: 4\n" in out


def test_unknown_key_exits_2_with_one_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  file: x.jsonl\nlora:\n  rank: 8\n")
    code, out = run("finetune", "--recipe", str(path), "--dry-run")
    assert_user_error(code, out, f"recipe {path}: lora.rank: unknown key (known keys: r, alpha, dropout, target_modules)")


def test_missing_recipe():
    code, out = run("finetune", "--recipe", "nope.yaml")
    assert_user_error(code, out, "recipe 'nope.yaml' not found; pass a YAML file path or a name from `slmops recipes list`")


def test_bad_set():
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--set", "lora.r")
    assert_user_error(code, out, "--set 'lora.r': expected key=value with a dotted key, e.g. --set lora.r=16")


def test_out_of_range_value():
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--set", "training.learning_rate=-1")
    assert code == 2
    assert out.endswith("training.learning_rate: Input should be greater than 0")


def test_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--data", "missing.jsonl", "--dry-run")
    assert_user_error(
        code, out,
        f"data file 'missing.jsonl' not found: looked at missing.jsonl and {tmp_path}/missing.jsonl "
        f"(SLMOPS_DATA_DIR is {tmp_path}); set SLMOPS_DATA_DIR to the folder that holds it, or pass --data PATH")


def test_bad_rows_exit_2_before_training(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "--data", str(data), "--set", "data.format=alpaca", "-o", str(tmp_path / "out"))
    assert_user_error(code, out, f"{data.resolve()}: 1 bad row(s): row 2 field 'output': is missing; "
                                 "fix those rows or set data.format (read as 'alpaca')")
    assert not (tmp_path / "out").exists()


def test_model_that_is_not_a_model(tmp_path):
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tmp_path), "--dry-run",
                    "-o", str(tmp_path / "out"))
    assert_user_error(code, out, f"model path '{tmp_path}' is not a Hugging Face model folder (no config.json); "
                                 "pass a folder written by save_pretrained, a hub id, or the alias smollm2-135m-instruct")


def test_existing_output(tmp_path, tiny_model):
    (tmp_path / "out").mkdir()
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "-o", str(tmp_path / "out"), "--dry-run")
    assert_user_error(code, out, f"output folder '{tmp_path / 'out'}' already exists; pass another -o/--output, "
                                 "or remove it")


def test_dry_run_prints_plan_and_json(tmp_path, tiny_model):
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "-o", str(tmp_path / "out"), "--dry-run", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert (result["dry_run"], result["counts"]) == (True, {"sft": [462, 51]})
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    assert config["passes"]["sft"]["r"] == 16


def test_finetune_summary(tmp_path, tiny_model):
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "-o", str(tmp_path / "out"), "--set", "training.max_steps=2", "--set", "data.max_samples=8",
                    "--set", "data.eval_split=null", "--set", "training.dtype=float32")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == (f"Fine-tuned {tiny_model} with lora (r=16, q_proj, k_proj, v_proj, o_proj), stages sft"
                        " - recipe smollm2-135m-sft-h4rmony")
    assert "  sft           8 train, 0 eval examples" in lines
    assert "    steps       2" in lines
    assert f"  adapter       {tmp_path / 'out' / 'adapter'}" in lines


@pytest.mark.parametrize("flag", ["--bogus", "--recipe"])
def test_usage_errors_exit_2(flag):
    code, out = run("finetune", flag)
    assert code == 2


def test_finetune_json_stdout_is_clean(tmp_path, tiny_model):
    code, out = run("finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "-o", str(tmp_path / "out"), "--set", "training.max_steps=2", "--set", "data.max_samples=8",
                    "--set", "training.dtype=float32", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["stages"]["sft"]["steps"] == 2 and result["adapter_dir"] == str(tmp_path / "out" / "adapter")


def test_verbose_raises_olive_log_level(tmp_path, tiny_model):
    code, out = run("--verbose", "finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--model", str(tiny_model),
                    "-o", str(tmp_path / "out"), "--dry-run")
    assert code == 0, out
    assert json.loads((tmp_path / "out" / "olive_config.json").read_text())["log_severity_level"] == 1
