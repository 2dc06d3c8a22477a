"""Each workaround in slmops.core.compat has a test here that fails once upstream no longer needs it."""

import pytest
from olive.telemetry import telemetry as olive_telemetry

from slmops.core import compat


def _fresh_telemetry(monkeypatch):
    calls = []
    monkeypatch.setattr(olive_telemetry.Telemetry, "_instance", None)
    for var in olive_telemetry._CI_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(olive_telemetry.Telemetry, "_create_logger", lambda self: None)
    monkeypatch.setattr(olive_telemetry.Telemetry, "_log_heartbeat", lambda self, *a, **k: calls.append("heartbeat"))
    return calls


def test_olive_still_sends_a_heartbeat_despite_disable_flag(monkeypatch):
    """Fails when Olive honours OLIVE_DISABLE_TELEMETRY before its heartbeat:
    then compat.silence_olive_telemetry can go."""
    calls = _fresh_telemetry(monkeypatch)
    olive_telemetry.Telemetry()
    assert calls == ["heartbeat"]


def test_silenced_olive_telemetry_sends_nothing(monkeypatch):
    calls = _fresh_telemetry(monkeypatch)
    compat.silence_olive_telemetry()
    telemetry = olive_telemetry.Telemetry()
    telemetry.log("OliveAction", {"invoked_from": "test"})
    telemetry.disable_telemetry()
    assert calls == []
    assert telemetry._logger is None


def test_olive_still_drops_warmup_ratio_under_transformers_5():
    """Fails when Olive maps warmup_ratio again: then olive_config can render warmup_ratio instead of
    passing the ratio as warmup_steps."""
    from olive.passes.pytorch.lora import HFTrainingArguments

    args = HFTrainingArguments(output_dir="unused", warmup_ratio=0.5).create_training_args()
    assert args.warmup_steps == 0
    assert (
        HFTrainingArguments(output_dir="unused", extra_args={"warmup_steps": 0.5}).create_training_args().warmup_steps
        == 0.5
    )


def _builder_pass(cls, precision="int4"):
    from olive.hardware.accelerator import AcceleratorSpec

    spec = AcceleratorSpec("cpu", "CPUExecutionProvider")
    return cls(
        spec,
        cls.generate_config(
            spec, {"precision": precision, "int4_nodes_to_exclude": ["/lm_head/MatMul"]}, disable_search=True
        ),
    )


def test_olives_model_builder_still_fails_on_the_installed_onnxruntime_genai(tiny_model, tmp_path):
    """Why slmops.shipping.passes.model_builder exists: Olive 0.13's own ModelBuilder pass cannot build with
    onnxruntime-genai 0.15+ (quantized_model import, create_model without parse_extra_options).
    Fails once it can: then render Olive's ModelBuilder again and drop SlmopsModelBuilder."""
    from olive.model import HfModelHandler
    from olive.passes.onnx.model_builder import ModelBuilder

    model = HfModelHandler(model_path=str(tiny_model), task="text-generation")
    with pytest.raises(Exception, match="quantized_model|parse_extra_options"):
        _builder_pass(ModelBuilder).run(model, str(tmp_path / "olive"))
    assert not (tmp_path / "olive" / "model.onnx").exists()


def test_slmops_model_builder_builds_and_honours_the_exclusions(tiny_model, tmp_path):
    import onnx
    from olive.model import HfModelHandler

    from slmops.shipping.passes.model_builder import SlmopsModelBuilder

    model = HfModelHandler(model_path=str(tiny_model), task="text-generation")
    built = _builder_pass(SlmopsModelBuilder).run(model, str(tmp_path / "slmops"))
    graph = onnx.load(built.model_path, load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert ops["/lm_head/MatMul"] == "MatMul"  # excluded under its int4_ name, which 0.18 reads only renamed
    assert ops["/model/layers.0/attn/o_proj/MatMul_Q4"] == "MatMulNBits"


def test_option_text_spells_the_builders_command_line():
    from slmops.shipping.passes.model_builder import option_text

    assert option_text("int4_nodes_to_exclude", ["/a", "/b"]) == "nodes_to_exclude=/a,/b"
    assert option_text("int4_op_types_to_quantize", ["MatMul", "Gather"]) == "op_types_to_quantize=MatMul/Gather"
    assert option_text("int4_is_symmetric", False) == "is_symmetric=false"
    assert option_text("kv_cache_quant_scheme", "int8_per_tensor") == "kv_cache_quant_scheme=int8_per_tensor"


def test_onnxruntime_genai_still_claims_npu_providers_on_a_cpu_build():
    """Why slmops.core.choices.available_targets asks ONNX Runtime's provider list, not onnxruntime-genai's
    is_*_available(): on this CPU-only build the latter claims QNN. Fails once it tells the truth."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    if "QNNExecutionProvider" in ort.get_available_providers():
        return  # a machine that really has QNN proves nothing
    assert og.is_qnn_available()


def test_olive_cache_still_takes_config_strings_for_paths(tmp_path, monkeypatch):
    """Why slmops.core.compat.olive_cwd runs Olive from an empty folder: a config value such as
    precision 'fp32' is taken for a file when the working directory has a folder 'fp32'.
    Fails once Olive stops doing that."""
    from olive.resource_path import find_all_resources

    (tmp_path / "fp32").mkdir()
    monkeypatch.chdir(tmp_path)
    assert find_all_resources({"passes": {"builder": {"precision": "fp32"}}})


def test_export_runs_from_a_folder_with_confusing_names(tiny_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from slmops.cli import cli
    from test_export import make_adapter

    qv = make_adapter(tiny_model, tmp_path / "qv", 4, ["q_proj", "v_proj"], seed=1)
    (tmp_path / "fp32").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", "-m", str(tiny_model), "-a", f"qv={qv}", "-p", "fp32", "-o", "b"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "slmops.json").is_file()


def test_an_interrupt_swallowed_inside_the_block_is_raised_after_it():
    import os
    import signal

    import pytest

    from slmops.core.compat import honour_interrupts

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with honour_interrupts():
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except:  # noqa: E722 - what the builder does
                pass
    assert signal.getsignal(signal.SIGINT) == before


def test_olive_qlora_still_trains_every_linear_layer(tiny_model, tmp_path):
    """slmops.training.passes.qlora exists because Olive's QLoRA replaces target_modules with every 4-bit linear."""
    pytest.importorskip("bitsandbytes")
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.model import HfModelHandler
    from olive.passes.pytorch.lora import QLoRA

    spec = AcceleratorSpec("cpu", "CPUExecutionProvider")
    olive_pass = QLoRA(
        spec,
        QLoRA.generate_config(
            spec,
            {
                "train_data_config": {"name": "x", "type": "HuggingfaceContainer"},
                "target_modules": ["q_proj"],
                "torch_dtype": "float32",
                "training_args": {},
            },
            disable_search=True,
        ),
    )
    model = HfModelHandler(model_path=str(tiny_model), task="text-generation")
    from olive.passes.pytorch.lora import QLoRATrainingArguments

    config = olive_pass.config
    config.training_args = QLoRATrainingArguments()  # as the pass's run sets it before this step
    _, peft_model, _, _ = olive_pass.get_quant_model(model, config, str(tmp_path))
    assert set(peft_model.peft_config["default"].target_modules) > {"q_proj"}


def test_onnxruntime_genai_still_refuses_a_short_generation_with_a_windowed_kv_cache(tmp_path):
    """Why core.compat.BUILDER_OPTIONS turns the builder's windowed_kv_cache off: built with it, a sliding-window
    model (Gemma 2) cannot generate with max_length below its window. Fails once it can."""
    import subprocess
    import sys

    import onnxruntime_genai as og

    from test_architectures import FAMILIES, family_model

    model = family_model(FAMILIES["gemma2"], tmp_path / "gemma2")  # window 16
    out = tmp_path / "onnx"
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", model, "-o", out, "-p", "fp32", "-e", "cpu"],
        check=True,
        capture_output=True,
    )
    built = og.Model(str(out))
    params = og.GeneratorParams(built)
    params.set_search_options(max_length=8)
    generator = og.Generator(built, params)
    with pytest.raises(Exception, match="local_window_size"):
        generator.append_tokens([1, 2, 3])
