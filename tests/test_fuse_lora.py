"""FuseLoRA on hand-built graphs: packing q/k/v (mixed 4/8-bit) with their LoRA gives the same outputs in ORT."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmops.shipping.passes.fuse_lora import fuse_lora

K, BLOCK = 64, 32
WIDTHS = {"q_proj": 48, "k_proj": 16, "v_proj": 16}


def _nbits(rng, name: str, n: int, bits: int, x: str, accuracy_level: int, inits: list):
    """A MatMulNBits with random blocks, scales and zero points (all values are valid at any bit width)."""
    if bits == 32:  # a float MatMul
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (K, n)).astype(np.float32), f"{name}.weight"))
        return helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}/output_0"], name=name)
    blocks = K // BLOCK
    weight = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
    zp = rng.integers(0, 256, (n, (blocks + 1) // 2 if bits == 4 else blocks), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.02, (n, blocks)).astype(np.float32)
    base = name.replace("/", ".").strip(".")
    inits += [
        numpy_helper.from_array(weight, f"{base}.w"),
        numpy_helper.from_array(scale, f"{base}.s"),
        numpy_helper.from_array(zp, f"{base}.zp"),
    ]
    return helper.make_node(
        "MatMulNBits",
        [x, f"{base}.w", f"{base}.s", f"{base}.zp"],
        [f"{name}/output_0"],
        name=f"{name}_Q{bits}",
        domain="com.microsoft",
        K=K,
        N=n,
        bits=bits,
        block_size=BLOCK,
        accuracy_level=accuracy_level,
    )


def _lora(rng, module: str, base_out: str, x: str, rank: int, inits: list) -> tuple[list, str]:
    prefix = f"/model/layers.0/attn/{module}"
    a, b = f"model.layers.0.attn.{module}.lora_A.MatMul.weight", f"model.layers.0.attn.{module}.lora_B.MatMul.weight"
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.1, (K, rank)).astype(np.float32), a),
        numpy_helper.from_array(rng.normal(0, 0.1, (rank, WIDTHS[module])).astype(np.float32), b),
    ]
    nodes = [
        helper.make_node("MatMul", [x, a], [f"{prefix}/lora_A/MatMul/output_0"], name=f"{prefix}/lora_A/MatMul"),
        helper.make_node(
            "MatMul",
            [f"{prefix}/lora_A/MatMul/output_0", b],
            [f"{prefix}/lora_B/MatMul/output_0"],
            name=f"{prefix}/lora_B/MatMul",
        ),
        helper.make_node(
            "Add",
            [base_out, f"{prefix}/lora_B/MatMul/output_0"],
            [f"{prefix}/lora/Add/output_0"],
            name=f"{prefix}/lora/Add",
        ),
    ]
    return nodes, f"{prefix}/lora/Add/output_0"


def attention_block(bits: dict, lora_ranks: dict, accuracy_level: int = 0, seed: int = 0) -> onnx.ModelProto:
    """x -> q/k/v projections (some with LoRA) -> Concat: the builder's unpacked layout, any consumer."""
    rng = np.random.default_rng(seed)
    x, inits, nodes, outs = "/model/layers.0/input_layernorm/output_0", [], [], []
    nodes.append(helper.make_node("Identity", ["x"], [x], name="/model/layers.0/input_layernorm/LayerNorm"))
    for module, width in WIDTHS.items():
        base = _nbits(rng, f"/model/layers.0/attn/{module}/MatMul", width, bits[module], x, accuracy_level, inits)
        nodes.append(base)
        out = base.output[0]
        if module in lora_ranks:
            chain, out = _lora(rng, module, out, x, lora_ranks[module], inits)
            nodes += chain
        outs.append(out)
    nodes.append(helper.make_node("Concat", outs, ["y"], name="/model/layers.0/attn/Concat", axis=-1))
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, sum(WIDTHS.values())])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_mixed_bits_with_partial_lora_fuse_to_the_same_outputs(accuracy_level):
    # k_quant_mixed's layout: q, k in 4 bits, v in 8; a q/v LoRA of different ranks; k has none.
    model = attention_block({"q_proj": 4, "k_proj": 4, "v_proj": 8}, {"q_proj": 4, "v_proj": 2}, accuracy_level)
    x = np.random.default_rng(1).normal(size=(1, 3, K)).astype(np.float32)
    before = run(model, x)
    assert fuse_lora(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 2 and ops.count("Add") == 1 and "Split" in ops
    packed = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in packed.attribute}["bits"] == 8
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"].shape == (K, 6)
    b = inits["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"]
    assert b.shape == (6, 80) and not b[:, 48:64].any()  # no LoRA on k: its columns stay zero
    np.testing.assert_allclose(run(model, x), before, rtol=0, atol=1e-5)


def test_same_bits_pack_without_widening():
    model = attention_block({"q_proj": 4, "k_proj": 4, "v_proj": 4}, {"k_proj": 3})
    x = np.random.default_rng(2).normal(size=(1, 3, K)).astype(np.float32)
    before = run(model, x)
    assert fuse_lora(model) == 1
    packed = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in packed.attribute}["bits"] == 4
    np.testing.assert_allclose(run(model, x), before, rtol=0, atol=1e-5)


def test_a_layer_of_another_shape_is_left_alone():
    # One float projection among quantized ones: no single packed node can hold them, so nothing changes.
    model = attention_block({"q_proj": 4, "k_proj": 4, "v_proj": 32}, {"q_proj": 4})
    nodes = [n.name for n in model.graph.node]
    assert fuse_lora(model) == 0
    assert [n.name for n in model.graph.node] == nodes


def test_float_projections_pack_too():
    model = attention_block({"q_proj": 32, "k_proj": 32, "v_proj": 32}, {"q_proj": 2, "k_proj": 2, "v_proj": 2})
    x = np.random.default_rng(3).normal(size=(1, 3, K)).astype(np.float32)
    before = run(model, x)
    assert fuse_lora(model) == 1
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3  # packed base + one LoRA pair
    np.testing.assert_allclose(run(model, x), before, rtol=0, atol=1e-5)


def test_without_lora_and_without_attention_nothing_is_packed():
    model = attention_block({"q_proj": 4, "k_proj": 4, "v_proj": 4}, {})
    assert fuse_lora(model) == 0  # packing would only add a Split
