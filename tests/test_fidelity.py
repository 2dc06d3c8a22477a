"""Issue 17: exact GGUF blocks (GgufBlocks), parity on the user's texts (KL, perplexity, --min-agreement), and
`export --precision auto`. Tiny models: one random, one with its weights snapped to Q4_1 / Q8_0 grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tests.conftest import write_jsonl
from tests.test_export import make_adapter

from slmops.cli import cli
from slmops.shipping.gguf_grid import grid4, grid8, on_grid


def q4_1(w: np.ndarray, rng=None) -> np.ndarray:
    """w [out, in] on llama.cpp's Q4_1 grid along `in` (blocks of 32; d and m rounded to fp16 as GGUF stores them)."""
    b = w.reshape(w.shape[0], -1, 32)
    low = b.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
    d = ((b.max(-1, keepdims=True) - low) / 15).astype(np.float16).astype(np.float32)
    q = np.clip(np.round((b - low) / d), 0, 15)
    return (q * d + low).reshape(w.shape).astype(np.float32)


def q8_0(w: np.ndarray) -> np.ndarray:
    b = w.reshape(w.shape[0], -1, 32)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    return (np.round(b / d) * d).reshape(w.shape).astype(np.float32)


@pytest.fixture(scope="module")
def gguf_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with every projection on a Q4_1 grid and lm_head on Q8_0, as a GGUF dequantizes."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("gguf") / "model"
    shutil.copytree(tiny_model, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, w in tensors.items():
            if name.endswith("proj.weight"):
                tensors[name] = q4_1(w)
            elif name == "lm_head.weight":
                tensors[name] = q8_0(w)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def test_grids_are_recovered_exactly_and_random_weights_are_on_none():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    snapped = q4_1(w.T).T  # [K, N] as a MatMul holds it
    grid = grid4(snapped)
    assert grid is not None and grid.q.max() == 15
    rebuilt = grid.q.reshape(-1, 32, 64) * grid.scale[:, None] + grid.minimum[:, None]
    assert np.abs(rebuilt.reshape(96, 64) - snapped).max() < 1e-6
    narrow = snapped.copy()
    narrow[:32, 0] = np.arange(32) % 13 * 0.01  # a block using 13 levels only
    assert grid4(narrow) is not None
    assert grid4(w) is None and grid8(w) is None
    assert grid8(q8_0(w.T).T) is not None and grid4(q8_0(w.T).T) is None


def test_gguf_blocks_rewrite_is_exact_at_fp32_compute_and_leaves_lora_alone():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmops.shipping.passes.gguf_blocks import keep_gguf_blocks

    rng = np.random.default_rng(1)
    w = q4_1(rng.standard_normal((48, 64)).astype(np.float32)).T  # [64, 48]
    a = rng.standard_normal((64, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/attn/o_proj/MatMul"),
        helper.make_node("MatMul", ["x", "a"], ["z"], name="/model/layers.0/attn/o_proj/lora_A/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(a, "a")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counts = keep_gguf_blocks(model, block_size=16, accuracy_level=1)
    assert counts == {"int4": 1, "int8": 0, "float": 0}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 2  # the minimum's MatMul and the LoRA's
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    y, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.abs(y - x @ w).max() < 1e-4 and np.abs(z - x @ a).max() < 1e-6


def test_gguf_blocks_refuse_a_model_on_no_grid():
    from onnx import TensorProto, helper, numpy_helper

    from slmops.shipping.gguf_grid import NotOnGrid
    from slmops.shipping.passes.gguf_blocks import keep_gguf_blocks

    w = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/lm_head/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    with pytest.raises(NotOnGrid, match="no weight is on a GGUF block grid"):
        keep_gguf_blocks(helper.make_model(graph))


def test_default_export_keeps_a_gguf_sources_blocks(gguf_model, tiny_model, tmp_path):
    """int4 auto: gguf blocks for the snapped model, k_quant_mixed for the random one; at
    accuracy level 1 the gguf bundle matches PyTorch to fp32 rounding, base and adapter."""
    from slmops.shipping.manifest import read_manifest
    from slmops.shipping.parity import adapter_sources, check_parity

    assert on_grid(gguf_model) and not on_grid(tiny_model)
    adapter = make_adapter(gguf_model, tmp_path / "qv", 4, ["q_proj", "v_proj"], seed=3)
    runner = CliRunner()
    out = tmp_path / "b"
    result = runner.invoke(cli, ["export", "-m", str(gguf_model), "-a", f"qv={adapter}", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "int4 gguf, block 32, accuracy level 4" in result.output
    q = read_manifest(out).quantization
    assert (q.int4_algo, q.block_size) == ("gguf", 32)
    exact = tmp_path / "exact"
    result = runner.invoke(
        cli, ["export", "-m", str(gguf_model), "-a", f"qv={adapter}", "--accuracy-level", "1", "-o", str(exact)]
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(exact)
    report = check_parity(exact, manifest, gguf_model, adapter_sources(manifest, {}))
    assert [r.name for r in report.rows] == ["base", "qv"]
    assert all(r.max_abs_diff < 1e-3 and r.agreement == 1.0 for r in report.rows), report.rows
    other = tmp_path / "random"
    result = runner.invoke(cli, ["export", "-m", str(tiny_model), "-o", str(other)])
    assert result.exit_code == 0, result.output
    assert read_manifest(other).quantization.int4_algo == "k_quant_mixed"


def test_verify_reports_kl_and_perplexity_on_the_users_texts(tiny_model, tmp_path):
    runner = CliRunner()
    bundle = tmp_path / "b"
    assert runner.invoke(cli, ["export", "-m", str(tiny_model), "-o", str(bundle)]).exit_code == 0
    txt = tmp_path / "mine.txt"
    txt.write_text("The river carries the seeds of the forest down to the sea. " * 20)
    result = runner.invoke(cli, ["verify", str(bundle), "--parity", "--texts", str(txt), "--json"])
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["parity"]
    assert parity["source"] == str(txt) and parity["texts"] >= 2
    row = parity["rows"][0]
    assert row["kl_mean"] > 0 and row["kl_p99"] >= row["kl_mean"] and row["ppl"] > 1 and row["ppl_reference"] > 1
    rows = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"prompt": "Say hello.", "completion": "Hello there, friend."},
            {"prompt": "Name a tree.", "completion": "An oak tree."},
        ],
    )
    result = runner.invoke(cli, ["verify", str(bundle), "--parity", "--texts", str(rows), "--min-agreement", "1.0"])
    lowest = min(r["agreement"] for r in parity["rows"])
    if lowest < 1.0:  # int4 on a random model rarely agrees everywhere; where it does, the floor holds
        assert result.exit_code == 1 and "is below --min-agreement 100.0%" in result.output
    result = runner.invoke(cli, ["verify", str(bundle), "--parity", "--texts", str(rows), "--min-agreement", "0"])
    assert result.exit_code == 0 and "2 texts: " in result.output and "KL mean" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["verify", "{bundle}", "--texts", "x.txt"],
            "--texts and --min-agreement set up the --parity check: add --parity",
        ),
        (["verify", "{bundle}", "--parity", "--texts", "{tmp}/none.txt"], "--texts {tmp}/none.txt: no such file"),
        (
            ["export", "-m", "{model}", "--int4-algo", "gguf", "-o", "{tmp}/o"],
            "--int4-algo gguf needs weights dequantized from a GGUF (Q4_0/Q4_1 blocks of 32), and",
        ),
        (
            ["export", "-m", "{model}", "--float-layers", "0", "-o", "{tmp}/o"],
            "--float-layers applies to --int4-algo gguf only; drop it or choose gguf",
        ),
        (
            ["export", "-m", "{model}", "--min-agreement", "0.9", "-o", "{tmp}/o"],
            "--min-agreement and --texts choose among candidates: add --precision auto",
        ),
        (
            ["export", "-m", "{model}", "-p", "auto", "--dry-run", "-o", "{tmp}/o"],
            "--precision auto builds and measures its candidates: drop --dry-run, or name a precision",
        ),
        (
            ["export", "-m", "{model}", "--float-layers", "a", "-o", "{tmp}/o"],
            "--float-layers 'a': expected layer numbers",
        ),
        (
            ["export", "-m", "{model}", "-p", "auto", "--int4-algo", "rtn", "-o", "{tmp}/o"],
            "--precision auto chooses the int4 method, block size and accuracy level itself",
        ),
    ],
)
def test_fidelity_refusals(tiny_model, tmp_path, args, message):
    bundle = tmp_path / "b"
    assert CliRunner().invoke(cli, ["export", "-m", str(tiny_model), "-p", "fp32", "-o", str(bundle)]).exit_code == 0
    fill = {"bundle": str(bundle), "tmp": str(tmp_path), "model": str(tiny_model)}
    result = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(f"Error: {message.format(**fill)}"), result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_gguf_refusals_on_a_gguf_model(gguf_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["export", "-m", str(gguf_model), "--int4-algo", "gguf", "--block-size", "64", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "which block size 64 cannot hold; use --block-size 16 or 32" in result.output
    result = runner.invoke(cli, ["export", "-m", str(gguf_model), "--float-layers", "7", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--float-layers 7:" in result.output and "has layers 0-1" in result.output
    assert not (tmp_path / "o").exists()


def test_precision_auto_keeps_the_fastest_candidate_that_meets_the_floor(gguf_model, tmp_path):
    """Floor 0: the first candidate (int4 RTN) is kept and nothing after it is built. Floor 1.0: only a
    candidate that agrees everywhere is kept; the table in the manifest and the model card says which
    was measured and why each was or was not kept. The same inputs give the same choice."""
    from slmops.shipping.manifest import read_manifest

    runner = CliRunner()
    first = tmp_path / "first"
    result = runner.invoke(
        cli, ["export", "-m", str(gguf_model), "-p", "auto", "--min-agreement", "0", "-o", str(first)]
    )
    assert result.exit_code == 0, result.output
    search = read_manifest(first).precision_search
    assert search["chosen"] == "int4-rtn" and search["min_agreement"] == 0
    assert [c["status"] for c in search["candidates"]][1:] == ["not built: a faster candidate met the floor"] * 5
    assert read_manifest(first).quantization.int4_algo == "rtn"
    strict = tmp_path / "strict"
    result = runner.invoke(
        cli, ["export", "-m", str(gguf_model), "-p", "auto", "--min-agreement", "1.0", "-o", str(strict)]
    )
    assert result.exit_code == 0, result.output
    search = read_manifest(strict).precision_search
    chosen = next(c for c in search["candidates"] if c["status"] == "chosen")
    assert chosen["name"] == search["chosen"] and chosen["agreement"]["base"] == 1.0
    measured = [c for c in search["candidates"] if c["agreement"]]
    assert all(c["status"] == "below the floor" for c in measured if c is not chosen)
    assert all(c["decode_tps"] > 0 and c["size_mb"] > 0 for c in measured)
    assert "## Precision, chosen by measurement" in (strict / "README.md").read_text()
    assert not list(strict.glob(".candidates")) and (strict / "model.onnx").is_file()
    again = tmp_path / "again"
    assert (
        runner.invoke(
            cli, ["export", "-m", str(gguf_model), "-p", "auto", "--min-agreement", "1.0", "-o", str(again)]
        ).exit_code
        == 0
    )
    assert read_manifest(again).precision_search["chosen"] == search["chosen"]
    assert runner.invoke(cli, ["verify", str(strict)]).exit_code == 0
