"""CUDA paths: QLoRA as the tutorials set it up, export to CUDA fp16 / int4, run and bench on the GPU.

Marked `gpu` and skipped where there is no CUDA device (CI, these 2-core machines); they run
unchanged on a machine with one: `python -m pytest -m gpu`.
"""

import json

import pytest

from slmops.training.finetune import finetune
from test_export import run
from test_finetune import tiny_recipe

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _genai_cuda() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version("onnxruntime-genai-cuda"))
    except PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_model):
    """nf4 + double quant + bf16 compute, gradient checkpointing, paged AdamW: the seed tutorials' QLoRA."""
    pytest.importorskip("bitsandbytes")
    tmp = tmp_path_factory.mktemp("gpu")
    recipe = tiny_recipe(
        tmp, tiny_model, extra="  gradient_checkpointing: true\n  optimizer: paged_adamw_32bit\n  dtype: bfloat16\n"
    )
    recipe.method = "qlora"
    result = finetune(recipe, tmp / "out")
    assert result.stages["sft"].steps == 3
    return tmp / "out"


def test_qlora_trains_on_cuda(qlora_adapter):
    config = json.loads((qlora_adapter / "olive_config.json").read_text())["passes"]["sft"]
    assert config["quant_type"] == "nf4" and config["double_quant"] is True and config["compute_dtype"] == "bfloat16"
    assert config["training_args"]["optim"] == "paged_adamw_32bit"
    adapter = json.loads((qlora_adapter / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_export_run_and_bench_on_cuda(qlora_adapter, tiny_model, tmp_path, precision):
    out = tmp_path / precision
    code, msg = run("export", "-m", tiny_model, "-a", f"q={qlora_adapter}", "-t", "cuda", "-p", precision, "-o", out)
    assert code == 0, msg
    assert "CUDAExecutionProvider" in (out / "olive_config.json").read_text()
    if not _genai_cuda():
        pytest.skip("onnxruntime-genai here is the CPU build: install onnxruntime-genai-cuda to run the bundle")
    code, msg = run("generate", out, "-a", "q", "-p", "Hello", "--max-new-tokens", "8")
    assert code == 0, msg
    code, msg = run("bench", out, "--reps", "1", "--json")
    assert code == 0, msg
