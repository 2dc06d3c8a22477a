"""Bad input, command by command: one line naming the problem and the fix, exit 2, no traceback,
and nothing written where the command would have written."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import SFT_DATA, write_jsonl, write_recipe
from slmops.cli import cli
from test_export import make_adapter

GOOD_RECIPE = """
model: {{name: {model}}}
data: {{file: {data}, max_samples: 8, max_seq_len: 32}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
training: {{max_steps: 2, batch_size: 2, dtype: float32}}
"""


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """Everything the cases point at: recipes, data files, adapters and a bundle."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "model": tiny_model}
    w["adapter"] = make_adapter(tiny_model, root / "adapter", 4, ["q_proj", "v_proj"], seed=1)
    bundle = root / "bundle"
    result = CliRunner().invoke(
        cli, ["export", "-m", str(tiny_model), "-a", f"a={w['adapter']}", "-p", "fp32", "-o", str(bundle)]
    )
    assert result.exit_code == 0, result.output
    w["bundle"] = bundle
    broken = root / "broken-bundle"
    shutil.copytree(bundle, broken)
    (broken / "tokenizer.json").unlink()
    w["broken"] = broken
    from transformers import LlamaConfig, LlamaForCausalLM

    other = root / "other-model"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    w["foreign"] = make_adapter(other, root / "foreign", 4, ["q_proj"], seed=3)
    w["empty"] = root / "empty.jsonl"
    w["empty"].write_text("")
    w["latin1"] = root / "latin1.jsonl"
    w["latin1"].write_bytes('{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"))
    w["missing_field"] = write_jsonl(
        root / "missing.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    )
    w["no_pairs"] = write_jsonl(root / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}])
    return w


def recipe(w, body: str, name: str) -> str:
    return str(write_recipe(w["root"] / f"{name}.yaml", body.format(model=w["model"], data=SFT_DATA)))


# (case id, args(world, out) -> argv, a piece of the one-line message)
CASES = [
    (
        "malformed-yaml",
        lambda w, o: ["finetune", "-r", recipe(w, "model: [unclosed\n", "m1"), "-o", o],
        "invalid YAML at line",
    ),
    (
        "unknown-key",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE + "lora_extra: 1\n", "m2"), "-o", o],
        "lora_extra: unknown key",
    ),
    (
        "mistyped-key",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE.replace("r: 4", "rank: 4"), "m3"), "-o", o],
        "lora.rank: unknown key (known keys:",
    ),
    (
        "wrong-type",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m4"), "-o", o, "--set", "training.max_steps=many"],
        "training.max_steps",
    ),
    (
        "out-of-range",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m5"), "-o", o, "--set", "lora.r=0"],
        "lora.r: Input should be greater than",
    ),
    (
        "missing-data",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m6"), "-o", o, "-d", "nope.jsonl"],
        "data file 'nope.jsonl' not found",
    ),
    (
        "empty-data",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m7"), "-o", o, "-d", w["empty"]],
        "the data set is empty",
    ),
    (
        "non-utf8-data",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m8"), "-o", o, "-d", w["latin1"]],
        "line 1 is not UTF-8 text; re-save the file as UTF-8",
    ),
    (
        "row-missing-field",
        lambda w, o: [
            "finetune",
            "-r",
            recipe(w, GOOD_RECIPE, "m9"),
            "-o",
            o,
            "-d",
            w["missing_field"],
            "--set",
            "data.format=alpaca",
        ],
        "row 2 field 'output': is missing",
    ),
    (
        "pair-missing-field",
        lambda w, o: ["eval", "--model", w["model"], "--adapter", w["adapter"], "--data", w["no_pairs"]],
        "rejected",
    ),
    (
        "not-a-model",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m10"), "-o", o, "-m", w["root"]],
        "is not a Hugging Face model folder",
    ),
    (
        "resume-and-dry-run",
        lambda w, o: ["finetune", "-r", recipe(w, GOOD_RECIPE, "m11"), "-o", o, "--resume", "--dry-run"],
        "drop one of them",
    ),
    (
        "foreign-adapter",
        lambda w, o: ["export", "-m", w["model"], "-a", f"f={w['foreign']}", "-o", o],
        "does not fit base",
    ),
    (
        "adapter-not-found",
        lambda w, o: ["export", "-m", w["model"], "-a", f"x={w['root'] / 'nope'}", "-o", o],
        "has no adapter_config.json",
    ),
    (
        "into-and-output",
        lambda w, o: ["export", "--into", w["bundle"], "-a", f"b={w['adapter']}", "-o", o],
        "--into and -o conflict",
    ),
    (
        "precision-for-target",
        lambda w, o: ["export", "-m", w["model"], "-a", f"a={w['adapter']}", "-t", "qnn", "-p", "fp32", "-o", o],
        "target qnn does not take precision fp32",
    ),
    ("bundle-file-removed", lambda w, o: ["verify", w["broken"]], "missing: tokenizer.json"),
    ("not-a-bundle", lambda w, o: ["generate", w["root"], "-p", "hi"], "is not an slmops bundle"),
    ("unknown-adapter", lambda w, o: ["generate", w["bundle"], "-a", "nope", "-p", "hi"], "unknown adapter 'nope'"),
    ("missing-bundle", lambda w, o: ["chat", w["root"] / "nope"], "not found"),
    (
        "unavailable-ep",
        lambda w, o: ["bench", w["bundle"], "--ep", "cuda", "-o", o],
        "execution provider cuda is not available here",
    ),
    ("bad-scenario", lambda w, o: ["bench", w["bundle"], "--scenario", "128", "-o", o], "expected PROMPT:NEW"),
    ("serve-missing-bundle", lambda w, o: ["serve", w["root"] / "nope"], "not found"),
    (
        "serve-adapter-dir-missing",
        lambda w, o: ["serve", w["bundle"], "--adapter-dir", w["root"] / "nope"],
        "does not exist",
    ),
    ("preview-missing-recipe", lambda w, o: ["data", "preview", "-r", w["root"] / "nope.yaml"], "nope.yaml"),
    (
        "preview-bad-train-on",
        lambda w, o: ["data", "preview", "-r", recipe(w, GOOD_RECIPE, "p1"), "--set", "data.train_on=every"],
        "train_on",
    ),
]


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, case, argv, expected):
    out = tmp_path / "out"
    before = sorted(p.name for p in world["root"].iterdir())
    result = CliRunner().invoke(cli, [str(a) for a in argv(world, out)])
    message = result.output.strip()
    assert result.exit_code == 2, message
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    assert message.startswith("Error: ") and expected in message, message
    assert not out.exists() and not list(tmp_path.glob(".slmops-*"))  # nothing written
    assert sorted(p.name for p in world["root"].iterdir() if not p.name.endswith(".yaml")) == [
        n for n in before if not n.endswith(".yaml")
    ]
    assert json.loads((world["bundle"] / "slmops.json").read_text())["adapters"].keys() == {"a"}
