"""The DPO pass inside real Olive workflows (tiny model), and `slmops eval` on known answers."""

import json
import math

import pytest
from click.testing import CliRunner

from conftest import PREFERENCE_DATA, SFT_DATA, write_jsonl, write_recipe
from slmops.cli import cli
from slmops.measuring.evaluate import PairScores, evaluate_preferences, preference_metrics
from slmops.training.finetune import finetune
from slmops.training.recipe import load_recipe

SFT = f"""data:
  file: {SFT_DATA}
  max_samples: 8
  max_seq_len: 64
training:
  max_steps: 3
  batch_size: 2
  learning_rate: 5.0e-2
  dtype: float32
"""


def dpo_block(extra: str = "") -> str:
    return f"""dpo:
  data:
    file: {PREFERENCE_DATA}
    max_samples: 8
    eval_split: 0.05
  max_length: 64
  max_steps: 2
  batch_size: 2
  learning_rate: 5.0e-2
  dtype: float32
{extra}"""


def recipe(tmp_path, model, body):
    return load_recipe(
        str(write_recipe(tmp_path / "r.yaml", f"model:\n  name: {model}\nlora:\n  r: 4\n  alpha: 8\n" + body))
    )


def test_dpo_alone_through_olive(tmp_path, tiny_model, no_network):
    r = recipe(tmp_path, tiny_model, dpo_block())
    result = finetune(r, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    assert list(config["passes"]) == ["dpo"] and config["passes"]["dpo"]["type"] == "DPO"
    dpo = result.stages["dpo"]
    assert dpo.steps == 2
    assert dpo.train_seconds > 0 and dpo.tokens > 0  # what scripts/bench_dpo.py reads
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(dpo.train_metrics)
    assert {"rewards/accuracies", "rewards/margins"} <= set(dpo.eval_metrics)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in log} == {"dpo"}
    assert no_network == []


def test_sft_then_dpo_in_one_workflow(tmp_path, tiny_model):
    r = recipe(tmp_path, tiny_model, SFT + dpo_block())
    result = finetune(r, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "olive_config.json").read_text())
    assert [p["type"] for p in config["passes"].values()] == ["LoRA", "DPO"]
    assert result.stages["sft"].steps == 3 and result.stages["dpo"].steps == 2
    # The reference is the SFT policy: DPO's first step is computed before any update, when
    # policy == reference, so its implicit rewards are zero although the SFT adapter already
    # moved the model off the base (test_sft_adapter_really_moved_the_model).
    first = next(e for e in result.log if e["stage"] == "dpo" and "loss" in e)
    assert first["step"] == 1
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    adapters = list((tmp_path / "out").rglob("adapter_config.json"))
    assert adapters == [tmp_path / "out" / "adapter" / "adapter_config.json"]
    saved = json.loads(adapters[0].read_text())
    assert saved["r"] == 4


def test_sft_adapter_really_moved_the_model(tmp_path, tiny_model):
    """Guards the test above: the SFT adapter alone changes answer log-probs vs the base."""
    finetune(recipe(tmp_path, tiny_model, SFT), tmp_path / "sft")
    pairs = [
        {
            "prompt": [{"role": "user", "content": "Is the forest good?"}],
            "chosen": "Yes, trees help.",
            "rejected": "No.",
        }
    ]
    report = evaluate_preferences(
        tiny_model, pairs, adapter=tmp_path / "sft" / "adapter", max_length=64, progress=False
    )
    assert report.reward_margin != 0


def test_qlora_dpo(tmp_path, tiny_model):
    pytest.importorskip(
        "bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install 'slmops[qlora]')"
    )
    r = recipe(tmp_path, tiny_model, "method: qlora\n" + dpo_block())
    result = finetune(r, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "olive_config.json").read_text())["passes"]["dpo"]["quantization"] == "4bit"
    assert result.stages["dpo"].steps == 2


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "q", "chosen": "a"}], "row 1 field 'rejected': is missing"),
        ([{"prompt": "q", "chosen": "same", "rejected": "same"}], "row 1 field 'rejected': is the same as chosen"),
        ([{"chosen": "alpha", "rejected": "omega"}], "row 1 field 'prompt': is empty"),
    ],
)
def test_bad_preference_data_exits_2(tmp_path, tiny_model, rows, message):
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    path = write_recipe(tmp_path / "r.yaml", f"model:\n  name: {tiny_model}\ndpo:\n  data:\n    file: {data}\n")
    result = CliRunner().invoke(cli, ["finetune", "--recipe", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {data.resolve()}: 1 bad row(s): {message}")
    assert not (tmp_path / "out").exists()


# --- eval -------------------------------------------------------------------------------------


def test_preference_metrics_known_answer():
    policy = PairScores(
        chosen=[-10.0, -20.0, -5.0],
        rejected=[-12.0, -10.0, -6.0],
        chosen_tokens=[10, 10, 1],
        rejected_tokens=[2, 10, 2],
    )
    reference = PairScores(
        chosen=[-11.0, -20.0, -5.0],
        rejected=[-11.0, -10.0, -4.0],
        chosen_tokens=[10, 10, 1],
        rejected_tokens=[2, 10, 2],
    )
    m = preference_metrics(policy, reference, beta=0.5)
    assert m["preference_accuracy"] == round(2 / 3, 4)  # pairs 1 and 3
    # per token: -1 > -6 yes; -2 > -1 no; -5 > -3 no
    assert m["preference_accuracy_normalised"] == round(1 / 3, 4)
    # margins: 0.5*((1) - (-1)) = 1.0; 0.5*(0 - 0) = 0; 0.5*(0 - (-2)) = 1.0
    assert m["reward_accuracy"] == round(2 / 3, 4)
    assert m["reward_margin"] == round(2 / 3, 4)
    expected_loss = (2 * math.log1p(math.exp(-1.0)) + math.log(2)) / 3
    assert m["eval_loss"] == round(expected_loss, 4)
    # reference: -11 > -11, -20 > -10, -5 > -4 are all false
    assert m["reference_preference_accuracy"] == 0.0


def test_eval_zero_adapter_is_the_base(tmp_path, tiny_model):
    """A fresh LoRA (B = 0) is the base: margins exactly 0, no reward accuracy, loss log 2."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"])
    ).save_pretrained(tmp_path / "zero")
    pairs = [
        {"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"good answer {i}", "rejected": "bad"}
        for i in range(5)
    ]
    report = evaluate_preferences(tiny_model, pairs, adapter=tmp_path / "zero", max_length=64, progress=False)
    assert report.pairs == 5
    assert report.reward_margin == 0 and report.reward_accuracy == 0
    assert report.eval_loss == round(math.log(2), 4)
    assert report.preference_accuracy == report.reference_preference_accuracy


def test_eval_cli_on_recipe_held_out_pairs(tmp_path, tiny_model):
    path = write_recipe(tmp_path / "r.yaml", f"model:\n  name: {tiny_model}\n" + dpo_block().replace("0.05", "0.1"))
    result = CliRunner().invoke(cli, ["eval", "--recipe", str(path), "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pairs"] == 4 and report["adapter"] is None
    assert 0 <= report["preference_accuracy"] <= 1


def test_eval_cli_errors(tmp_path, tiny_model):
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model)])
    assert result.exit_code == 2 and "pass --recipe R (its held-out pairs) or --data PREFS" in result.output
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    result = CliRunner().invoke(
        cli, ["eval", "--model", str(tiny_model), "--data", str(data), "--adapter", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: adapter '{tmp_path}' is not a PEFT adapter folder (no adapter_config.json); "
        "pass the adapter/ folder of a finetune run"
    )
