"""slmops compare: the metrics and tests on hand-computed cases, and runs on a tiny model with known answers."""

from __future__ import annotations

import json
import math
from itertools import takewhile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_jsonl
from slmops.cli import cli
from slmops.measuring.compare import (
    CompareRequest,
    compare,
    lcs_length,
    mcnemar_test,
    paired_test,
    rouge_l,
    sign_flip_test,
)
from test_export import make_adapter

SFT_ROWS = [
    {"instruction": "Name a way to save energy at home.", "output": "Turn off the lights when you leave a room."},
    {"instruction": "Why are bees important?", "output": "Bees pollinate plants that give us food."},
    {"instruction": "Suggest a green way to travel.", "output": "Walk or ride a bicycle for short trips."},
    {"instruction": "What is compost?", "output": "Compost is decayed food and garden waste that feeds the soil."},
    {"instruction": "Give one tip to use less water.", "output": "Take shorter showers."},
]
LONG = (
    "we should consider the many different ways in which the natural world gives us clean air, water and food, "
    "and think carefully about every choice we make"
)
# A summed log-probability falls with every answer token, so a 2-word answer beats a 30-word one:
# pairs 1-3 are right (short chosen), pair 4 is wrong (long chosen). Accuracy 0.75.
PAIRS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": LONG},
    {"prompt": "Do trees grow?", "chosen": "They do.", "rejected": LONG},
    {"prompt": "Can birds fly?", "chosen": "Most can.", "rejected": LONG},
    {"prompt": "Is water wet?", "chosen": LONG, "rejected": "No."},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices gain nothing from threads, and on a busy CPU OpenMP's spinning
    threads make these tests 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-adapters")
    return {
        "zero": make_adapter(tiny_model, root / "zero", 4, ["q_proj", "v_proj"], seed=1, std=0.0),
        "moved": make_adapter(tiny_model, root / "moved", 4, ["q_proj", "v_proj", "o_proj"], seed=2, std=0.5),
    }


def run_compare(tiny_model, adapters, data, **options):
    return compare(
        CompareRequest(
            model=str(tiny_model),
            model_path=tiny_model,
            adapters=adapters,
            data=str(data),
            max_new_tokens=6,
            max_length=128,
            batch_size=2,
            progress=False,
            **options,
        )
    )


# --- pure functions -----------------------------------------------------------------------------


def test_rouge_l_hand_computed():
    assert lcs_length("the cat sat".split(), "the cat sat on the mat".split()) == 3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)  # LCS "a c": P 2/3, R 1/2
    assert rouge_l("The CAT", "the cat") == 1.0
    assert rouge_l("dog", "the cat") == 0.0
    assert rouge_l("", "the cat") == 0.0


def test_mcnemar_hand_computed():
    assert mcnemar_test(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 0.021484375
    assert mcnemar_test(9, 1) == mcnemar_test(1, 9)
    assert mcnemar_test(0, 0) == 1.0
    assert mcnemar_test(5, 5) == 1.0  # capped: 2 * P(X <= 5) > 1


def test_sign_flip_exact_hand_computed():
    # 8 sign patterns of [1, 2, 3]: |sum| >= 6 only for +++ and ---
    assert sign_flip_test([1, 2, 3]) == 0.25
    assert sign_flip_test([-1, -2, -3]) == 0.25
    assert sign_flip_test([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_test([]) == 1.0
    # [1, 1, 1, -1]: sums of the 16 patterns reach |2| in 10 of them (|sum| 4: 2, |sum| 2: 8)
    assert sign_flip_test([1, 1, 1, -1]) == 10 / 16


def test_sign_flip_sampled_beyond_16():
    same = [0.0] * 30
    assert sign_flip_test(same) == 1.0
    shifted = [1.0] * 30  # exact p is 2 / 2^30; sampling can only say "under 1 in 20001"
    assert sign_flip_test(shifted) == 1 / 20001
    noisy = [(-1) ** i * (i % 5) + 0.2 for i in range(40)]
    assert sign_flip_test(noisy, seed=3) == sign_flip_test(noisy, seed=3)
    assert 0 < sign_flip_test(noisy) < 1


def test_paired_test_picks_mcnemar_for_flags():
    base = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    adapter = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # 1 pair lost, 9 won, 2 right in both
    t = paired_test("base", "a", "correct", base, adapter)
    assert (t.test, t.n, t.mean_diff) == ("mcnemar", 12, round(8 / 12, 4))
    assert t.p_value == float(f"{2 * 11 / 1024:.4g}")
    t = paired_test("base", "a", "nll", [3.0, 2.0, 1.0], [4.0, 4.0, 4.0])
    assert (t.test, t.mean_diff, t.p_value) == ("sign-flip", 2.0, 0.25)


# --- on the tiny model --------------------------------------------------------------------------


def test_zero_adapter_is_the_base(tmp_path, tiny_model, adapters):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    c = run_compare(tiny_model, adapters, data)
    assert (c.kind, c.rows, c.examples) == ("sft", 5, 5)
    assert c.metrics["zero"] == c.metrics["base"]
    assert c.per_example["zero"] == c.per_example["base"]
    assert all(g["outputs"]["zero"] == g["outputs"]["base"] for g in c.generations)
    versus_zero = [t for t in c.tests if (t.a, t.b) == ("base", "zero")]
    assert [t.metric for t in versus_zero] == ["nll", "rouge_l"]
    assert all(t.p_value == 1.0 and t.mean_diff == 0 for t in versus_zero)
    # the other adapter really runs: its loss moves, and it is tested against both
    assert c.metrics["moved"]["eval_loss"] != c.metrics["base"]["eval_loss"]
    assert [(t.a, t.b) for t in c.tests] == [("base", "zero")] * 2 + [("base", "moved")] * 2 + [("zero", "moved")] * 2


def test_eval_loss_matches_a_direct_computation(tmp_path, tiny_model, adapters):
    """Mean NLL over completion tokens, computed here with the model and chat template directly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    c = run_compare(tiny_model, {"moved": adapters["moved"]}, data, generate=False)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    moved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapters["moved"]).eval()
    for name, model in (("base", base), ("moved", moved)):
        nll, tokens, per_example = 0.0, 0, []
        for row in SFT_ROWS:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": row["instruction"]}], add_generation_prompt=True, tokenize=False
            )
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            # the answer and its end-of-turn token are scored, not the newline the template adds after them
            c_ids = tok(row["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
            losses = torch.nn.functional.cross_entropy(
                logits[len(p_ids) - 1 : -1], torch.tensor(c_ids), reduction="sum"
            )
            nll, tokens = nll + losses.item(), tokens + len(c_ids)
            per_example.append(losses.item() / len(c_ids))
        assert c.metrics[name]["eval_loss"] == pytest.approx(nll / tokens, abs=1e-4)
        assert c.metrics[name]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
        assert c.per_example[name]["nll"] == pytest.approx(per_example, abs=1e-5)
    assert "rouge_l" not in c.metrics["base"] and c.generations == []


def test_preference_accuracy_known_answer(tmp_path, tiny_model, adapters):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    c = run_compare(tiny_model, {"zero": adapters["zero"], "moved": adapters["moved"]}, data)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    def logp(prompt: str, answer: str) -> float:
        p_ids = tok(
            tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        a_ids = tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + a_ids])).logits[0, len(p_ids) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(a_ids)[:, None]).sum().item()

    flags = [float(logp(p["prompt"], p["chosen"]) > logp(p["prompt"], p["rejected"])) for p in PAIRS]
    assert flags == [1.0, 1.0, 1.0, 0.0]
    assert c.kind == "preference"
    assert c.per_example["base"]["correct"] == flags
    assert c.metrics["base"]["preference_accuracy"] == 0.75 == c.metrics["zero"]["preference_accuracy"]
    mcnemar = [t for t in c.tests if t.metric == "correct" and (t.a, t.b) == ("base", "zero")]
    assert [(t.test, t.n, t.p_value) for t in mcnemar] == [("mcnemar", 4, 1.0)]
    assert [g["reference"] for g in c.generations] == [p["chosen"] for p in PAIRS]


# --- the command --------------------------------------------------------------------------------


def table(report: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table under a heading, header and rule left out."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_cli_report_matches_json(tmp_path, tiny_model, adapters):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    out = tmp_path / "reports" / "ab.md"
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            "--model",
            str(tiny_model),
            "-a",
            f"zero={adapters['zero']}",
            "-a",
            str(adapters["moved"]),
            "--data",
            str(data),
            "--max-new-tokens",
            "6",
            "--max-length",
            "128",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    report = out.read_text()
    assert report.startswith("# slmops compare\n")
    assert f"- data: `{data}` (sft, 5 of 5 examples)" in report
    assert [p.name for p in out.parent.iterdir()] == ["ab.md"]  # no temporary file left
    metrics = table(report, "## Metrics")
    assert [row[0] for row in metrics] == ["base", "zero", "moved"]
    for name, *cells in metrics:
        m = numbers["metrics"][name]
        assert [float(x) for x in cells] == [m["eval_loss"], m["perplexity"], m["rouge_l"]]
    tests = table(report, "## Paired tests")
    assert len(tests) == len(numbers["tests"]) == 6
    for row, t in zip(tests, numbers["tests"]):
        assert row[:5] == [t["a"], t["b"], t["metric"], t["test"], str(t["n"])]
        assert (float(row[5]), float(row[6])) == (t["mean_diff"], t["p_value"])
    generations = report.split("## Generations", 1)[1]
    assert generations.count("\n### ") == 5 == len(numbers["generations"])
    assert all(generations.count(f"**{name}**") == 5 for name in ("prompt", "reference", "base", "zero", "moved"))
    assert numbers["generations"][0]["outputs"]["moved"] in generations


def test_cli_prints_markdown_without_output(tmp_path, tiny_model, adapters):
    data = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            "--model",
            str(tiny_model),
            "-a",
            f"z={adapters['zero']}",
            "--data",
            str(data),
            "--no-generate",
            "--max-samples",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# slmops compare\n")
    assert "(preference, 3 of 4 examples)" in result.stdout
    assert table(result.stdout, "## Metrics")[0][0] == "base"
    assert "## Generations" not in result.stdout


def different_base_adapter(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "other-base")
    return make_adapter(folder / "other-base", folder / "other", 4, ["q_proj"], seed=0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing data", "data file '{tmp}/nope.jsonl' not found"),
        ("empty data", "{tmp}/empty.jsonl: the data set is empty; give a file with at least one row"),
        (
            "no adapter",
            "adapter 'nowhere': '{tmp}/nowhere' has no adapter_config.json; pass a PEFT adapter folder "
            "or an `slmops finetune` output folder",
        ),
        ("twice", "--adapter name 'zero' is given twice; give each adapter its own NAME=PATH"),
        ("named base", "adapter name 'base' is not usable: it must not be 'base'"),
        ("other base", "adapter 'other' does not fit the model (size mismatch for "),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_model, adapters, case, message):
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    args = {
        "missing data": lambda: ["-a", str(adapters["zero"]), "--data", str(tmp_path / "nope.jsonl")],
        "empty data": lambda: ["-a", str(adapters["zero"]), "--data", str(write_jsonl(tmp_path / "empty.jsonl", []))],
        "no adapter": lambda: ["-a", str(tmp_path / "nowhere"), "--data", str(sft)],
        "twice": lambda: ["-a", str(adapters["zero"]), "-a", f"zero={adapters['moved']}", "--data", str(sft)],
        "named base": lambda: ["-a", f"base={adapters['zero']}", "--data", str(sft)],
        "other base": lambda: ["-a", str(different_base_adapter(tmp_path)), "--data", str(sft)],
    }[case]()
    result = CliRunner().invoke(cli, ["compare", "--model", str(tiny_model), "--no-generate", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("Error: " + message.format(tmp=tmp_path)), result.stderr
    if case == "other base":
        assert lines[0].endswith("pass the base model the adapter was trained on with --model")
