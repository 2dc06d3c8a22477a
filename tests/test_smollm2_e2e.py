"""The one real end-to-end path: the shipped SFT recipe on the embedded SmolLM2-135M-Instruct."""

import json

import pytest
from click.testing import CliRunner

from slmops.cli import cli

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Suggest a weekend activity for a family."}]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "sft"
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--recipe",
            "smollm2-135m-sft-h4rmony",
            "-o",
            str(out),
            "--json",
            "--set",
            "training.max_steps=20",
            "--set",
            "data.eval_split=0.05",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_loss_falls(smollm2_run):
    _, result = smollm2_run
    sft = result["stages"]["sft"]
    assert sft["steps"] == 20
    assert sft["eval_loss"] < sft["eval_loss_start"] - 0.05, sft
    assert sft["final_loss"] < sft["first_loss"], sft


def test_adapter_loads_in_peft_and_changes_output(smollm2_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops.core.models import resolve_model

    out, _ = smollm2_run
    base_path = resolve_model("smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        base_out = model.generate(ids, max_new_tokens=24, do_sample=False)
        tuned = PeftModel.from_pretrained(model, out / "adapter")
        tuned_out = tuned.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    assert not torch.equal(base_out, tuned_out)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not list(out.rglob("model.safetensors"))  # no copy of the base model


def test_sft_then_dpo_recipe_on_smollm2(tmp_path):
    """The shipped chain recipe, few steps: one Olive workflow, one adapter that peft loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmops.core.models import resolve_model

    out = tmp_path / "chain"
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--recipe",
            "smollm2-135m-sft-dpo",
            "-o",
            str(out),
            "--json",
            "--set",
            "training.max_steps=6",
            "--set",
            "data.eval_split=null",
            "--set",
            "dpo.max_steps=4",
            "--set",
            "dpo.data.eval_max_samples=8",
        ],
    )
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert (stages["sft"]["steps"], stages["dpo"]["steps"]) == (6, 4)
    assert "rewards/accuracies" in stages["dpo"]["eval_metrics"]
    config = json.loads((out / "olive_config.json").read_text())
    assert [p["type"] for p in config["passes"].values()] == ["LoRA", "DPO"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    tuned = PeftModel.from_pretrained(model, out / "adapter")
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in tuned.named_parameters())


def test_export_int4_bundle_generates_and_verifies(smollm2_run, tmp_path):
    """The trained adapter through Olive's export: an int4 bundle whose adapter changes the reply
    and whose adapter path tracks the base's fidelity."""
    out, _ = smollm2_run
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export", "-a", f"sft={out}", "-o", str(bundle)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "slmops.json").read_text())
    assert (manifest["quantization"]["int4_algo"], manifest["quantization"]["block_size"]) == ("gguf", 32)
    assert manifest["adapters"]["sft"]["recipe"] == "smollm2-135m-sft-h4rmony"
    assert manifest["adapters"]["sft"]["metrics"]["sft"]["steps"] == 20

    replies = {}
    for adapter in ([], ["-a", "sft"]):
        result = CliRunner().invoke(
            cli, ["generate", str(bundle), *adapter, "-p", PROMPT[0]["content"], "--max-new-tokens", "24", "--json"]
        )
        assert result.exit_code == 0, result.output
        replies[bool(adapter)] = json.loads(result.stdout)["text"]
    assert replies[True] != replies[False] and all(len(t.split()) >= 5 for t in replies.values()), replies

    result = CliRunner().invoke(cli, ["verify", str(bundle), "--parity", "--json"])
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["parity"]
    assert parity["source"] == "held-out rows of smollm2-135m-sft-h4rmony"  # the recipe's eval_split, not shipped
    base, sft = parity["rows"]
    # the source's Q4_1 blocks kept exactly: measured 91-95% (README precision table), k_quant_mixed 68-78%
    assert base["agreement"] > 0.88 and sft["agreement"] >= base["agreement"] - 0.03
    assert 0 < base["kl_mean"] < 0.05 and abs(base["ppl"] / base["ppl_reference"] - 1) < 0.05

    # llama.cpp on the embedded GGUF, interleaved with the bundle: the baseline `bench` reports ratios against
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            str(bundle),
            "--baseline",
            "llamacpp",
            "--skip-no-lora-base",
            "--scenario",
            "64:16",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    llama = [r for r in report["rows"] if r["engine"] == "llama.cpp"]
    assert [(r["variant"], r["adapter"]) for r in llama] == [("SmolLM2-135M-Instruct.Q4_1.gguf", "base")]
    assert llama[0]["decode_tps"] > 1 and llama[0]["prefill_tps"] > 1 and llama[0]["peak_rss_mb"] > 50
    summary = report["summary"]["64in/16out"]
    assert summary["x_llamacpp"] == pytest.approx(summary["ort_decode_tps"] / llama[0]["decode_tps"])
    assert summary["prefill_x_llamacpp"] == pytest.approx(summary["ort_prefill_tps"] / llama[0]["prefill_tps"])
