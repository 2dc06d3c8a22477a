"""Export, bundle, verify and the runtime on a tiny random Llama, end to end through Olive and onnxruntime-genai."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmops.cli import cli

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(*args, input=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    return result.exit_code, (result.stdout if result.exit_code == 0 else result.output).strip()


def make_adapter(model: Path, out: Path, r: int, modules: list[str], seed: int, std: float = 0.02) -> Path:
    """A PEFT LoRA on `model` whose B is non-zero (a trained adapter's size of change), saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, task_type="CAUSAL_LM"),
    )
    for name, tensor in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(tensor, std=std)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "qv": make_adapter(tiny_model, root / "qv", 4, ["q_proj", "v_proj"], seed=1),
        "all": make_adapter(tiny_model, root / "all", 8, ALL, seed=2),
    }


@pytest.fixture(scope="module")
def bundle(tiny_model, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "int4"
    code, output = run(
        "export", "-m", tiny_model, "-a", f"qv={adapters['qv']}", "-a", f"all={adapters['all']}", "-o", out
    )
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def fp32_bundle(tiny_model, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    code, output = run(
        "export",
        "-m",
        tiny_model,
        "-a",
        f"qv={adapters['qv']}",
        "-a",
        f"all={adapters['all']}",
        "-p",
        "fp32",
        "-o",
        out,
    )
    assert code == 0, output
    return out


def test_bundle_layout_and_manifest(bundle, tiny_model):
    names = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert {
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "olive_config.json",
        "README.md",
        "slmops.json",
        "adapters/qv.onnx_adapter",
        "adapters/all.onnx_adapter",
    } <= names
    assert not any(p.name.startswith(".slmops-partial-") for p in bundle.parent.iterdir())
    manifest = json.loads((bundle / "slmops.json").read_text())
    assert set(manifest["files"]) == names - {"slmops.json"}
    assert manifest["quantization"]["precision"] == "int4"
    assert manifest["target"]["execution_provider"] == "CPUExecutionProvider"
    assert manifest["adapters"]["qv"]["rank"] == 4 and manifest["adapters"]["all"]["rank"] == 8
    assert manifest["lora_inputs"]["modules"] == sorted(ALL)
    assert manifest["versions"]["olive-ai"] and manifest["versions"]["onnxruntime-genai"]
    assert "| qv | 4 | q_proj, v_proj |" in (bundle / "README.md").read_text()
    olive = json.loads((bundle / "olive_config.json").read_text())
    assert [p["type"] for p in olive["passes"].values()] == ["SlmopsModelBuilder", "FuseLoRA", "ExtractAdapters"]


def test_lora_stays_float_and_base_is_int4(bundle):
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    lora = [name for name in ops if "/lora_" in name and name.endswith("/MatMul")]
    # FuseLoRA: one A/B pair per layer for qkv, gate_up, o and down (not one per projection)
    assert len(lora) == 2 * 2 * 4 and all(ops[n] == "MatMul" for n in lora)
    assert {n.split("/")[4] for n in lora} == {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"}
    assert sum(op == "MatMulNBits" for op in ops.values()) >= 2 * 4
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[0].endswith("qkv_proj/lora/Add/output_0") and not n.input[1] for n in attention)


def test_adapter_tensors_match_graph_inputs(bundle):
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    inputs = {i.name for i in graph.input if ".lora_" in i.name}
    # rank of each A: per projection the adapter's rank (zeros where untrained); a fused group the
    # sum over its trained members, or the adapter's rank of zeros when it trains none of them
    expected = {
        "qv": {"qkv_proj": 2 * 4, "gate_up_proj": 4, "o_proj": 4, "down_proj": 4},
        "all": {"qkv_proj": 3 * 8, "gate_up_proj": 2 * 8, "o_proj": 8, "down_proj": 8},
    }
    for name, ranks in expected.items():
        params = ort.AdapterFormat.read_adapter(str(bundle / f"adapters/{name}.onnx_adapter")).get_parameters()
        assert set(params) == inputs  # every LoRA input of the graph
        assert {k.split(".")[4]: v.shape()[1] for k, v in params.items() if ".lora_A." in k} == ranks
    params = ort.AdapterFormat.read_adapter(str(bundle / "adapters/qv.onnx_adapter")).get_parameters()
    assert not params["model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight"].numpy().any()  # qv has no MLP LoRA


def test_each_adapter_generates_differently(bundle):
    from slmops.shipping.runtime import Runtime, Sampling

    rt = Runtime(bundle)
    prompt = rt.chat_prompt([{"role": "user", "content": "Tell me about the sea"}])
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=3)  # a random model's greedy text is degenerate
    outputs = {name: rt.generate(prompt, name, sampling).tokens for name in (None, "qv", "all")}
    assert len({tuple(t) for t in outputs.values()}) == 3
    assert rt.generate(prompt, None, sampling).tokens == outputs[None]  # switching back is clean


def test_generate_cli_and_sampling_seed(bundle):
    args = ("generate", bundle, "-a", "qv", "-p", "hello", "--max-new-tokens", "8", "--json")
    code, out = run(*args, "--temperature", "1.0", "--seed", "7")
    assert code == 0, out
    again = run(*args, "--temperature", "1.0", "--seed", "7")[1]
    assert json.loads(out)["text"] == json.loads(again)["text"]
    result = json.loads(out)
    assert result["adapter"] == "qv" and 1 <= result["completion_tokens"] <= 8


def test_stop_string_cuts_the_completion(bundle):
    from slmops.shipping.runtime import Runtime, Sampling

    rt = Runtime(bundle)
    full = rt.generate("the", None, Sampling(max_new_tokens=16))
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = rt.generate("the", None, Sampling(max_new_tokens=16), stop=(stop,))
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_chat_switches_adapters(bundle):
    result = CliRunner().invoke(
        cli, ["chat", str(bundle), "--max-new-tokens", "4"], input="hi\n/adapter qv\nhi\n/adapter nope\n/quit\n"
    )
    out = result.output  # stdout and stderr
    assert result.exit_code == 0, out
    assert "qv> " in out and "Error: unknown adapter 'nope'; this bundle has: qv, all" in out


def test_verify_passes_and_fp32_parity(fp32_bundle):
    code, out = run("verify", fp32_bundle, "--parity", "--json")
    assert code == 0, out
    report = json.loads(out)["parity"]
    assert [r["name"] for r in report["rows"]] == ["base", "qv", "all"]
    assert all(r["max_abs_diff"] <= 1e-3 for r in report["rows"])
    assert all(r["agreement"] >= 0.99 for r in report["rows"])  # near-ties may flip in a random model


def test_int4_parity_adapters_track_the_base(bundle):
    code, out = run("verify", bundle, "--parity")
    assert code == 0, out
    assert "result: pass" in out and "top-1 agree" in out


def test_int8_bundle_runs_and_tracks_the_base(tiny_model, adapters, tmp_path):
    out = tmp_path / "int8"
    code, msg = run("export", "-m", tiny_model, "-a", f"qv={adapters['qv']}", "-p", "int8", "-o", out)
    assert code == 0, msg
    olive = json.loads((out / "olive_config.json").read_text())
    assert olive["passes"]["int8"]["bits"] == 8 and olive["passes"]["int8"]["nodes_to_exclude"]
    code, msg = run("verify", out, "--parity", "--json")
    assert code == 0, msg
    base, qv = json.loads(msg)["parity"]["rows"]
    assert base["agreement"] >= 0.95 and qv["agreement"] >= base["agreement"] - 0.05
    assert run("generate", out, "-a", "qv", "-p", "hi", "--max-new-tokens", "4")[0] == 0


def test_int8_kv_cache_is_calibrated_recorded_and_verified(tiny_model, adapters, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from slmops.shipping.kv_cache import calibrate

    out = tmp_path / "kv8"
    code, msg = run(
        "export",
        "-m",
        tiny_model,
        "-a",
        f"qv={adapters['qv']}",
        "-a",
        f"all={adapters['all']}",
        "-p",
        "fp32",
        "--kv-cache",
        "int8",
        "-o",
        out,
    )
    assert code == 0, msg
    manifest = json.loads((out / "slmops.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "int8" and manifest["kv_cache"]["models"] == ["base", "qv", "all"]
    assert "kv_cache_scales.json" in manifest["files"] and "| KV cache | int8" in (out / "README.md").read_text()
    scales = json.loads((out / "kv_cache_scales.json").read_text())
    # the graph holds the calibrated scales, and they are the model's own K/V peaks (adapters included) x 1.2 / 128
    graph = onnx.load(str(out / "model.onnx"))
    k0 = numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == "model.layers.0.attn.k_scale"))
    assert np.allclose(k0, scales["scales"]["k_scales"][0])
    base_only = calibrate(tiny_model, {})["scales"]
    assert all(a >= b for a, b in zip(scales["scales"]["k_scales"], base_only["k_scales"]))
    assert {i.type.tensor_type.elem_type for i in graph.graph.input if i.name.startswith("past_key")} == {
        onnx.TensorProto.INT8
    }
    # fp32 weights with an int8 cache are judged as quantized: by agreement, the cache on the measured path
    code, msg = run("verify", out, "--parity", "--json")
    assert code == 0, msg
    parity = json.loads(msg)["parity"]
    assert parity["kv_cache"] == "int8" and [r["name"] for r in parity["rows"]] == ["base", "qv", "all"]
    assert all(r["agreement"] >= 0.95 and 1e-6 < r["max_abs_diff"] < 0.5 for r in parity["rows"])
    assert run("generate", out, "-a", "all", "-p", "hi", "--max-new-tokens", "4")[0] == 0
    # an adapter whose K/V run past the fixed scales would clip: --into refuses it, a small one fits
    big = make_adapter(tiny_model, tmp_path / "big", 4, ["k_proj", "v_proj"], seed=7, std=2.0)
    code, msg = run("export", "--into", out, "-a", f"big={big}")
    assert code == 2 and "past the bundle's int8 KV cache range" in msg
    small = make_adapter(tiny_model, tmp_path / "small", 4, ["k_proj"], seed=8, std=1e-4)
    assert run("export", "--into", out, "-a", f"small={small}")[0] == 0


def test_int8_kv_cache_only_where_the_runtime_quantizes_it(tiny_model, tmp_path):
    code, msg = run("export", "-m", tiny_model, "-t", "webgpu", "--kv-cache", "int8", "--dry-run", "-o", tmp_path / "w")
    assert code == 2 and msg == (
        "Error: target webgpu cannot keep the KV cache in int8 (onnxruntime-genai quantizes "
        "it on cpu and cuda only); use --kv-cache fp32"
    )
    code, msg = run("export", "-m", tiny_model, "--kv-cache", "int8", "--dry-run", "-o", tmp_path / "c", "--json")
    assert code == 0, msg
    olive = json.loads((tmp_path / "c" / "olive_config.json").read_text())
    options = olive["passes"]["builder"]["extra_options"]
    assert options["kv_cache_quant_scheme"] == "int8_per_tensor"
    assert options["kv_cache_scale_file"].endswith("kv_cache_scales.json")


def test_tampered_or_missing_file_fails_verify(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    target = copy / "adapters" / "qv.onnx_adapter"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    (copy / "tokenizer_config.json").unlink()
    code, out = run("verify", copy)
    assert code == 2
    assert out == (
        f"Error: bundle {copy} fails verification: changed: adapters/qv.onnx_adapter; missing: "
        "tokenizer_config.json; re-export it (or restore the files)"
    )


def test_into_adds_an_adapter_without_rebuilding(bundle, tiny_model, tmp_path):
    from slmops.core.files import file_sha256

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    before = file_sha256(copy / "model.onnx")
    new = make_adapter(tiny_model, tmp_path / "new", 2, ["k_proj"], seed=5)
    code, out = run("export", "--into", copy, "-a", f"new={new}")
    assert code == 0, out
    assert file_sha256(copy / "model.onnx") == before
    assert run("verify", copy)[0] == 0
    code, out = run("generate", copy, "-a", "new", "-p", "hi", "--max-new-tokens", "4", "--json")
    assert code == 0, out
    code, out = run("export", "--into", copy, "-a", f"new={new}")
    assert code == 2 and "already has adapter(s) new" in out


def test_qv_graph_takes_a_k_adapter_later_but_not_an_o_adapter(tiny_model, adapters, tmp_path):
    # q/v adapters only: the fused qkv LoRA input also covers k (zero columns), so a k_proj adapter
    # fits with --into; o_proj has no LoRA input at all and is refused.
    out = tmp_path / "qv-only"
    assert run("export", "-m", tiny_model, "-a", f"qv={adapters['qv']}", "-p", "fp32", "-o", out)[0] == 0
    k_only = make_adapter(tiny_model, tmp_path / "k", 2, ["k_proj"], seed=6)
    code, msg = run("export", "--into", out, "-a", f"k={k_only}")
    assert code == 0, msg
    code, msg = run("verify", out, "--parity", "--json")
    assert code == 0, msg
    assert all(r["max_abs_diff"] <= 1e-3 for r in json.loads(msg)["parity"]["rows"])
    code, msg = run("export", "--into", out, "-a", f"all={adapters['all']}")
    assert code == 2
    assert msg.startswith("Error: adapter 'all' trains ") and "export again with this adapter" in msg
    assert not (out / "adapters" / "all.onnx_adapter").exists()
    assert run("verify", out)[0] == 0


def test_adapter_of_another_base_is_refused(tiny_model, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
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
    torch.manual_seed(0)
    foreign = make_adapter(other, tmp_path / "foreign", 4, ["q_proj"], seed=3)
    code, out = run("export", "-m", tiny_model, "-a", f"foreign={foreign}", "-o", tmp_path / "b")
    assert code == 2
    assert out == (
        f"Error: adapter 'foreign' does not fit base '{tiny_model}': layer 0 q_proj lora_A has shape "
        "[4, 32], the base needs [r, 64]; it was trained on another model"
    )
    assert not (tmp_path / "b").exists()


def test_recorded_base_fingerprint_is_checked(tiny_model, adapters, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(adapters["qv"], run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"model": {"name": "some-other-model", "sha256": "ab" * 32}}))
    code, out = run("export", "-m", tiny_model, "-a", f"qv={run_dir}", "-o", tmp_path / "b")
    assert code == 2 and out.startswith("Error: adapter 'qv' was trained on some-other-model")


@pytest.mark.parametrize(
    "target,extra",
    [
        ("cuda", ["-p", "fp16"]),
        ("webgpu", []),
        ("dml", ["--merge", "qv"]),
        ("qnn", ["--merge", "qv"]),
        ("openvino", ["--merge", "qv"]),
        ("vitisai", ["--merge", "qv"]),
    ],
)
def test_targets_render_and_validate(tiny_model, adapters, tmp_path, target, extra):
    out = tmp_path / target
    result = CliRunner().invoke(
        cli,
        [
            str(a)
            for a in (
                "export",
                "-m",
                tiny_model,
                "-a",
                f"qv={adapters['qv']}",
                "-t",
                target,
                *extra,
                "--dry-run",
                "-o",
                out,
            )
        ],
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith(f"... note: target {target}:")]
    assert bool(notes) == (target != "cpu")  # limits said before anything is built
    if target in ("dml", "qnn", "openvino", "vitisai"):
        assert any("merged model (--merge NAME), the route that works here" in n for n in notes)
    if target in ("qnn", "openvino", "vitisai"):
        assert any("static shapes" in n for n in notes) and any("calibration-based" in n for n in notes)
    config = json.loads(
        (out / ("olive_config.json" if "--merge" not in extra else "merged/qv/olive_config.json")).read_text()
    )
    assert (
        config["systems"]["local_system"]["accelerators"][0]["execution_providers"][0]
        .lower()
        .startswith(
            {
                "cuda": "cuda",
                "webgpu": "webgpu",
                "dml": "dml",
                "qnn": "qnn",
                "openvino": "openvino",
                "vitisai": "vitisai",
            }[target]
        )
    )
    assert not (out / "model.onnx").exists()


@pytest.mark.parametrize("target", ["dml", "qnn"])
def test_targets_without_adapters_say_so_up_front(tiny_model, adapters, tmp_path, target):
    code, out = run("export", "-m", tiny_model, "-a", f"qv={adapters['qv']}", "-t", target, "-o", tmp_path / "b")
    assert code == 2 and f"target {target} cannot switch adapters at run time" in out and "--merge qv" in out
    assert not (tmp_path / "b").exists()


def test_merged_variant_matches_the_adapter(tiny_model, adapters, tmp_path):
    out = tmp_path / "b"
    code, msg = run(
        "export",
        "-m",
        tiny_model,
        "-a",
        f"qv={adapters['qv']}",
        "-p",
        "fp32",
        "--merge",
        "qv",
        "--hf-merged",
        "-o",
        out,
    )
    assert code == 0, msg
    assert (out / "hf" / "qv" / "config.json").is_file() and (out / "merged" / "qv" / "model.onnx").is_file()
    code, msg = run("verify", out, "--parity", "--json")
    assert code == 0, msg
    rows = {r["name"]: r for r in json.loads(msg)["parity"]["rows"]}
    assert set(rows) == {"base", "qv", "merged:qv"} and rows["merged:qv"]["max_abs_diff"] <= 1e-3
    texts = {}
    for flags in (["-a", "qv"], ["--merged", "qv"]):
        code, msg = run(
            "generate",
            out,
            *flags,
            "-p",
            "the sea",
            "--max-new-tokens",
            "8",
            "--temperature",
            "1",
            "--seed",
            "4",
            "--json",
        )
        assert code == 0, msg
        texts[flags[0]] = json.loads(msg)["text"]
    assert texts["-a"] == texts["--merged"]
    code, msg = run("generate", out, "--merged", "nope", "-p", "x")
    assert (code, msg) == (2, "Error: unknown merged variant 'nope'; this bundle has: qv")


def test_failed_export_leaves_nothing(tiny_model, adapters, tmp_path, monkeypatch):
    from slmops.shipping import export as export_mod

    def boom(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_run_olive", boom)
    result = CliRunner().invoke(
        cli, ["export", "-m", str(tiny_model), "-a", f"qv={adapters['qv']}", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code != 0  # click turns the interrupt into Abort
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial folder


def test_a_builder_crash_is_one_line_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    from onnxruntime_genai.models import builder

    def crash(*args, **kwargs):
        raise ValueError("cannot reshape array of size 2592 into shape (576,newaxis)")

    monkeypatch.setattr(builder, "create_model", crash)
    code, msg = run("export", "-m", tiny_model, "-o", tmp_path / "b")
    assert code == 2
    assert msg.splitlines()[-1] == (
        "Error: Olive's build failed (ValueError: cannot reshape array of size 2592 into "
        "shape (576,newaxis)); rerun with --verbose to see Olive's log"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["-a", "qv=/nonexistent"],
            "adapter 'qv': '/nonexistent' has no adapter_config.json; pass a PEFT adapter "
            "folder or an `slmops finetune` output folder",
        ),
        (
            ["-a", "bad name=/x"],
            "--adapter 'bad name=/x': expected NAME=PATH with a NAME of letters, digits, '-', '_' or '.'",
        ),
        (["--hf-merged"], "--hf-merged writes the HF weights of merged variants: add --merge NAME"),
        (["-t", "cpu", "-p", "fp16"], "target cpu does not take precision fp16; use one of int4, int8, fp32"),
        (
            ["--lora-modules", "lm_head"],
            "--lora-modules lm_head is not a linear layer the exporter handles; choose "
            "from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        ),
    ],
)
def test_bad_export_input(tiny_model, tmp_path, args, message):
    code, out = run("export", "-m", tiny_model, *args, "-o", tmp_path / "b")
    assert (code, out) == (2, f"Error: {message}")
    assert not (tmp_path / "b").exists()


def test_recipe_picks_its_newest_finetune_output(tiny_model, adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tiny\nmodel:\n  name: {tiny_model}\ndata:\n  file: x.jsonl\nexport:\n  precision: fp32\n")
    code, out = run("export", "--recipe", recipe, "-o", "b")
    assert (code, out) == (
        2,
        "Error: no adapter given and no finetune output of recipe tiny under outputs/; run "
        "`slmops finetune --recipe tiny` first, or pass --adapter NAME=PATH",
    )
    for stamp in ("20260101-000000", "20260102-000000"):
        shutil.copytree(adapters["qv"], tmp_path / "outputs" / f"tiny-{stamp}" / "adapter")
    code, out = run("export", "--recipe", recipe, "-o", "b", "--json")
    assert code == 0, out
    manifest = json.loads((tmp_path / "b" / "slmops.json").read_text())
    assert manifest["quantization"]["precision"] == "fp32"  # from the recipe's export section
    assert manifest["adapters"]["tiny"]["source"].endswith("tiny-20260102-000000/adapter")


def test_export_conflicting_flags(bundle, tmp_path):
    code, out = run("export", "--into", bundle, "-a", "x=/y", "-o", tmp_path / "b")
    assert (code, out) == (
        2,
        "Error: --into and -o conflict: --into adds to an existing bundle, -o builds a new one; pass one",
    )
    code, out = run("export", "--into", bundle, "-a", "x=/y", "-p", "fp32")
    assert code == 2 and "--into only adds adapters" in out


def test_runtime_errors(bundle, tmp_path):
    assert run("generate", tmp_path / "nope", "-p", "hi") == (
        2,
        f"Error: bundle '{tmp_path / 'nope'}' not found; pass the folder `slmops export -o` wrote",
    )
    code, out = run("generate", bundle, "-a", "nope", "-p", "hi")
    assert (code, out) == (2, "Error: unknown adapter 'nope'; this bundle has: qv, all")
    cuda = tmp_path / "cuda"
    shutil.copytree(bundle, cuda)
    manifest = json.loads((cuda / "slmops.json").read_text())
    manifest["target"].update(name="cuda", execution_provider="CUDAExecutionProvider")
    (cuda / "slmops.json").write_text(json.dumps(manifest))
    from slmops.core.choices import available_targets

    if "cuda" not in available_targets():
        code, out = run("generate", cuda, "-p", "hi")
        assert (code, out) == (
            2,
            "Error: bundle is built for CUDAExecutionProvider, which this machine's ONNX "
            "Runtime does not have (it has: cpu); run it on a machine with that device, or "
            "export for --target cpu",
        )


def test_export_and_generate_make_no_outbound_connection(tiny_model, adapters, tmp_path, no_network):
    out = tmp_path / "b"
    assert run("export", "-m", tiny_model, "-a", f"qv={adapters['qv']}", "-p", "fp32", "-o", out)[0] == 0
    assert run("generate", out, "-a", "qv", "-p", "hi", "--max-new-tokens", "4")[0] == 0
    assert no_network == []


# ORT model packages: bundles of one model as variants, laid out by Olive's generate-model-package.


@pytest.fixture(scope="module")
def package(bundle, fp32_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages") / "tiny"
    code, msg = run("package", bundle, fp32_bundle, "-o", out)
    assert code == 0, msg
    assert msg.startswith(
        f"{out}.ortpackage: 2 variants (cpu-int4 on CPUExecutionProvider, cpu-fp32 on "
        "CPUExecutionProvider), adapters: all, qv, "
    )
    return Path(f"{out}.ortpackage")


def test_package_has_olives_layout_and_each_bundle(package, bundle, fp32_bundle):
    from slmops.shipping.package import variant_genai_config

    olive_manifest = json.loads((package / "manifest.json").read_text())
    assert olive_manifest["components"] == ["decoder"] and olive_manifest["producer"]["tool"] == "olive-ai"
    metadata = json.loads((package / "models/decoder/metadata.json").read_text())
    assert metadata["variants"] == {
        "cpu-int4": {"ep": "CPUExecutionProvider"},
        "cpu-fp32": {"ep": "CPUExecutionProvider"},
    }
    assert (package / "configs/tokenizer.json").is_file()
    assert not (package / "configs/adapters").exists() and not (package / "configs/slmops.json").exists()
    for variant, source in (("cpu-int4", bundle), ("cpu-fp32", fp32_bundle)):
        folder = package / "models/decoder" / variant
        assert variant_genai_config(package, variant) == json.loads((source / "genai_config.json").read_text())
        assert (folder / "bundle.json").read_bytes() == (source / "slmops.json").read_bytes()
        for name in ("model.onnx", "model.onnx.data", "adapters/qv.onnx_adapter", "adapters/all.onnx_adapter"):
            assert (folder / name).read_bytes() == (source / name).read_bytes(), (variant, name)
    manifest = json.loads((package / "slmops.json").read_text())
    assert manifest["format"] == "slmops-package" and list(manifest["variants"]) == ["cpu-int4", "cpu-fp32"]
    assert run("verify", package) == (0, f"{package}: {len(manifest['files'])} files match their sha256 in slmops.json")


def test_package_variants_generate_as_their_bundles(package, bundle, fp32_bundle):
    from slmops.shipping.runtime import Runtime, Sampling

    sampling = Sampling(max_new_tokens=10, temperature=1.0, seed=3)
    assert Runtime(package).variant == "cpu-int4"  # both run here: the first one given
    for variant, source in (("cpu-int4", bundle), ("cpu-fp32", fp32_bundle)):
        packaged, alone = Runtime(package, variant=variant), Runtime(source)
        for adapter in (None, "qv", "all"):
            assert (
                packaged.generate("the", adapter, sampling).tokens == alone.generate("the", adapter, sampling).tokens
            ), (variant, adapter)
    code, out = run(
        "generate", package, "--variant", "cpu-fp32", "-a", "all", "-p", "hi", "--max-new-tokens", "4", "--json"
    )
    assert code == 0 and json.loads(out)["completion_tokens"] == 4


def _as_target(source: Path, copy: Path, target: str, provider: str, drop_adapter=None) -> Path:
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "slmops.json").read_text())
    manifest["target"].update(name=target, execution_provider=provider)
    manifest["adapters"].pop(drop_adapter, None)
    (copy / "slmops.json").write_text(json.dumps(manifest))
    return copy


def test_package_refusals(package, bundle, fp32_bundle, tmp_path):
    from slmops.core.choices import available_targets

    assert run("package", bundle, bundle, "-o", tmp_path / "p") == (
        2,
        f"Error: bundles {bundle} and {bundle} are both cpu-int4; a package holds one bundle per target and "
        "precision: package one of them",
    )
    fewer = _as_target(fp32_bundle, tmp_path / "fewer", "cpu", "CPUExecutionProvider", drop_adapter="all")
    assert run("package", bundle, fewer, "-o", tmp_path / "p") == (
        2,
        f"Error: bundles {bundle} and {fewer} have different adapters (all, qv vs qv); export the same adapters "
        "for every variant",
    )
    assert run("package", bundle, tmp_path / "nope", "-o", tmp_path / "p")[0] == 2
    assert not list(tmp_path.glob("p*")) and not list(tmp_path.glob(".slmops-partial-*"))
    assert run("generate", package, "--variant", "x", "-p", "hi") == (
        2,
        "Error: unknown variant 'x'; this package has: cpu-int4, cpu-fp32",
    )
    assert run("generate", bundle, "--variant", "cpu-int4", "-p", "hi") == (
        2,
        f"Error: --variant is for model packages; '{bundle}' is a single bundle",
    )
    assert run("verify", package, "--parity")[0] == 2
    if "cuda" in available_targets():
        return
    cuda = _as_target(fp32_bundle, tmp_path / "cuda", "cuda", "CUDAExecutionProvider")
    assert run("package", bundle, cuda, "-o", tmp_path / "mixed")[0] == 0
    from slmops.shipping.runtime import Runtime

    assert Runtime(tmp_path / "mixed.ortpackage").variant == "cpu-int4"  # the variant this machine can run
    assert run("generate", tmp_path / "mixed.ortpackage", "--variant", "cuda-fp32", "-p", "hi") == (
        2,
        "Error: bundle is built for CUDAExecutionProvider, which this machine's ONNX Runtime does not have (it "
        "has: cpu); run it on a machine with that device, or export for --target cpu",
    )
    assert run("package", cuda, "-o", tmp_path / "gpu")[0] == 0
    assert run("generate", tmp_path / "gpu.ortpackage", "-p", "hi") == (
        2,
        "Error: no variant of this package runs here: it has cuda-fp32, this machine's ONNX Runtime has cpu; "
        "add a variant for one of those with `slmops package`",
    )


def test_tampered_package_fails_verify(package, tmp_path):
    copy = tmp_path / "copy.ortpackage"
    shutil.copytree(package, copy)
    (copy / "models/decoder/cpu-int4/adapters/qv.onnx_adapter").write_bytes(b"x")
    code, out = run("verify", copy)
    assert code == 2 and "changed: models/decoder/cpu-int4/adapters/qv.onnx_adapter" in out


def test_no_released_runtime_opens_olives_package_layout(package):
    """Compat: slmops resolves a package's variant itself (slmops.shipping.package.open_variant). This fails once
    the installed onnxruntime-genai, or ONNX Runtime's model-package reader, opens Olive 0.13's layout:
    then run packages through it instead."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    with pytest.raises(Exception):  # noqa: B017 - og raises a bare RuntimeError or OSError by version; any error is the point
        og.Model(og.Config(str(package)))
    if hasattr(ort, "ModelPackageContext"):
        with pytest.raises(Exception, match="manifest"):
            ort.ModelPackageContext(str(package))
