"""The CLI: exit codes and the exact one-line messages a user sees."""

import json
import re

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, SFT_DATA, write_jsonl, write_recipe
from slmops.cli import cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# The shipped recipe's own file is the real data; these tests only need some rows, in alpaca form.
FIXTURE_DATA = ("--data", str(SFT_DATA), "--set", "data.format=alpaca")
# Every command `slmops --help` listed when these tests were written; the walk below adds any new one.
KNOWN_COMMANDS = {
    "bench",
    "chat",
    "compare",
    "doctor",
    "eval",
    "export",
    "finetune",
    "generate",
    "package",
    "recipes",
    "runs",
    "serve",
    "sweep",
    "verify",
}


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout.strip() if result.exit_code == 0 else result.output.strip()


def assert_user_error(code, output, message):
    assert code == 2, output
    assert output == f"Error: {message}"
    assert "Traceback" not in output


def command_tree(group: click.Group = cli, path: tuple = ()) -> list[tuple[tuple, click.Command]]:
    """Every command under `group` (the group itself first), as (path of names, command), walked the way
    click resolves them, so a command added later is covered without touching this file."""
    ctx = click.Context(group, info_name="slmops")
    found = [(path, group)]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found += command_tree(command, path + (name,))
        else:
            found.append((path + (name,), command))
    return found


COMMANDS = command_tree()


def listed_commands(help_text: str) -> list[str]:
    """The names in the Commands: section of a group's --help."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)", section, re.MULTILINE)]


def test_help_lists_commands():
    assert KNOWN_COMMANDS <= set(cli.commands), "a command went missing from slmops"
    result = CliRunner().invoke(cli, ["--help"], prog_name="slmops")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: slmops [OPTIONS] COMMAND [ARGS]...\n")
    visible = [path[0] for path, command in COMMANDS if len(path) == 1 and not command.hidden]
    assert listed_commands(result.output) == visible  # every top-level command of the tree, in the group's order
    assert set(visible) >= KNOWN_COMMANDS


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "slmops" for p, _ in COMMANDS])
def test_every_command_has_help(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="slmops")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    usage = " ".join(("Usage: slmops",) + path)
    assert re.match(rf"{re.escape(usage)} \[OPTIONS\]", result.output), result.output.splitlines()[0]
    assert "--help  " in result.output  # the options section was rendered
    if isinstance(command, click.Group):  # a group's help lists each of its subcommands
        ctx = click.Context(command, info_name=path[-1] if path else "slmops")
        subcommands = [n for n in command.list_commands(ctx) if not command.get_command(ctx, n).hidden]
        assert subcommands and listed_commands(result.output) == subcommands


def test_every_group_is_walked():
    groups = {path for path, command in COMMANDS if isinstance(command, click.Group)}
    assert {(), ("recipes",), ("runs",)} <= groups
    assert {("recipes", "list"), ("recipes", "show"), ("recipes", "validate"), ("runs", "list"), ("runs", "show")} <= {
        path for path, _ in COMMANDS
    }


def recipe_name(path) -> str:
    return (yaml.safe_load(path.read_text()) or {}).get("name") or path.stem


def test_recipes_list_and_validate():
    assert len(RECIPES) >= 14
    code, out = run("recipes", "list")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()]
    assert sorted(row[0] for row in rows) == sorted(recipe_name(p) for p in RECIPES)  # each recipe file, once
    by_name = {row[0]: row for row in rows}
    assert by_name["smollm2-135m-qlora-h4rmony"][1:3] == ["sft", "qlora"]
    assert by_name["smollm2-135m-sft-dpo"][1:3] == ["sft+dpo", "lora"]
    code, out = run("recipes", "validate")
    assert code == 0, out
    lines = out.splitlines()
    assert all(line.startswith("ok  ") for line in lines), out
    assert sorted(line[len("ok  ") :].rsplit("/", 1)[-1] for line in lines) == [p.name for p in RECIPES]


def test_recipes_show_applies_set():
    code, out = run("recipes", "show", "smollm2-135m-sft-h4rmony", "--set", "lora.r=4")
    assert code == 0
    assert "  r: 4\n" in out


def test_unknown_key_exits_2_with_one_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "data:\n  file: x.jsonl\nlora:\n  rank: 8\n")
    code, out = run("finetune", "--recipe", str(path), "--dry-run")
    assert_user_error(
        code, out, f"recipe {path}: lora.rank: unknown key (known keys: r, alpha, dropout, target_modules)"
    )


def test_missing_recipe():
    code, out = run("finetune", "--recipe", "nope.yaml")
    assert_user_error(
        code, out, "recipe 'nope.yaml' not found; pass a YAML file path or a name from `slmops recipes list`"
    )


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
        code,
        out,
        f"data file 'missing.jsonl' not found: looked at missing.jsonl and {tmp_path}/missing.jsonl "
        f"(SLMOPS_DATA_DIR is {tmp_path}); set SLMOPS_DATA_DIR to the folder that holds it, or pass --data PATH",
    )


def test_bad_rows_exit_2_before_training(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    code, out = run(
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tiny_model),
        "--data",
        str(data),
        "--set",
        "data.format=alpaca",
        "-o",
        str(tmp_path / "out"),
    )
    assert_user_error(
        code,
        out,
        f"{data.resolve()}: 1 bad row(s): row 2 field 'output': is missing; "
        "fix those rows or set data.format (read as 'alpaca')",
    )
    assert not (tmp_path / "out").exists()


def test_model_that_is_not_a_model(tmp_path):
    code, out = run(
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tmp_path),
        "--dry-run",
        *FIXTURE_DATA,
        "-o",
        str(tmp_path / "out"),
    )
    assert_user_error(
        code,
        out,
        f"model path '{tmp_path}' is not a Hugging Face model folder (no config.json); "
        "pass a folder written by save_pretrained, a hub id, or the alias smollm2-135m-instruct",
    )


def test_existing_output(tmp_path, tiny_model):
    (tmp_path / "out").mkdir()
    code, out = run(
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tiny_model),
        *FIXTURE_DATA,
        "-o",
        str(tmp_path / "out"),
        "--dry-run",
    )
    assert_user_error(
        code, out, f"output folder '{tmp_path / 'out'}' already exists; pass another -o/--output, or remove it"
    )


def test_dry_run_prints_plan_and_json(tmp_path, tiny_model):
    code, out = run(
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tiny_model),
        *FIXTURE_DATA,
        "-o",
        str(tmp_path / "out"),
        "--dry-run",
        "--json",
    )
    assert code == 0, out
    result = json.loads(out)
    # 96 distinct rows; the recipe's eval_split 0.1 holds out round(9.6) = 10 of them
    assert (result["dry_run"], result["counts"]) == (True, {"sft": [86, 10]})
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    assert config["passes"]["sft"]["r"] == 8


def train_two_steps(tmp_path, tiny_model, *extra):
    """A real two-step fine-tune of the shipped SFT recipe on the tiny model and the fixture rows."""
    return run(
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tiny_model),
        *FIXTURE_DATA,
        "-o",
        str(tmp_path / "out"),
        "--set",
        "training.max_steps=2",
        "--set",
        "data.max_samples=8",
        "--set",
        "training.dtype=float32",
        *extra,
    )


def test_finetune_summary(tmp_path, tiny_model):
    code, out = train_two_steps(tmp_path, tiny_model, "--set", "data.eval_split=null")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == (
        f"Fine-tuned {tiny_model} with lora (r=8, q_proj, k_proj, v_proj, o_proj), stages sft"
        " - recipe smollm2-135m-sft-h4rmony"
    )
    assert "  sft           8 train, 0 eval examples" in lines
    assert "    steps       2" in lines
    assert f"  adapter       {tmp_path / 'out' / 'adapter'}" in lines


@pytest.mark.parametrize(
    "flag, message", [("--bogus", "No such option '--bogus'."), ("--recipe", "Option '--recipe' requires an argument.")]
)
def test_usage_errors_exit_2(flag, message):
    result = CliRunner().invoke(cli, ["finetune", flag], prog_name="slmops")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: {message}"], result.output  # one line, naming the option
    # click may add its usage and --help hint above it; nothing else
    assert set(result.output.splitlines()) <= {
        "Usage: slmops finetune [OPTIONS]",
        "Try 'slmops finetune --help' for help.",
        "",
        f"Error: {message}",
    }


def test_finetune_json_stdout_is_clean(tmp_path, tiny_model):
    code, out = train_two_steps(tmp_path, tiny_model, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["stages"]["sft"]["steps"] == 2 and result["adapter_dir"] == str(tmp_path / "out" / "adapter")


def test_verbose_raises_olive_log_level(tmp_path, tiny_model):
    code, out = run(
        "--verbose",
        "finetune",
        "--recipe",
        "smollm2-135m-sft-h4rmony",
        "--model",
        str(tiny_model),
        *FIXTURE_DATA,
        "-o",
        str(tmp_path / "out"),
        "--dry-run",
    )
    assert code == 0, out
    assert json.loads((tmp_path / "out" / "olive_config.json").read_text())["log_severity_level"] == 1
