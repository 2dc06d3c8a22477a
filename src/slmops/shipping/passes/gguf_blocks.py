"""GgufBlocks as an Olive pass: int4/int8 MatMulNBits that keep the blocks a GGUF-quantized source already has.

Why: a model dequantized from a GGUF file (llama.cpp's Q4_0, Q4_1, Q8_0) holds weights that already sit
on a 4- or 8-bit grid per block of 32 along the input dimension. Quantizing them again (k_quant,
RTN) puts a second grid on top of the first and loses 15-25 points of top-1 agreement on SmolLM2.
Read back exactly, the same bits cost nothing.

What, per MatMul with a constant fp32 weight W [K, N] (after ModelBuilder fp32 and FuseLoRA):
  - every block of 32 rows is d*q + m with q in 0..15 (Q4_1; Q4_0 is m = -8d): a 4-bit MatMulNBits with
    scale d and zero point z (the integer nearest -m/d) gives x @ (d*(q - z)); the rest, sum_b (m_b + d_b z_b)
    * (sum of x over block b), is a second MatMul of the activations' block sums with those offsets
    (K/32 x N, float). Llama.cpp's Q4_1 kernels add the minimum the same way;
  - every block is d*q with q in -127..127 (Q8_0, here the tied lm_head/embedding): an 8-bit MatMulNBits,
    and the embedding's Gather reads the same bytes through GatherBlockQuantized;
  - anything else (LoRA weights, a layer in float_layers, a weight on no grid) stays an fp32 MatMul.
block_size 16 splits each 32-block in two with the same scale: still exact, and at accuracy level 4 the
activations are then quantized per 16 values instead of 32 (README, levers: KL 0.0022 against 0.0035, -25% decode).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam
from onnx import helper, numpy_helper

from slmops.shipping.gguf_grid import GGUF_BLOCK, GGUF_BLOCK_SIZES, Grid4, Grid8, NotOnGrid, grid4, grid8

logger = logging.getLogger(__name__)

_LORA = re.compile(r"/lora_[AB]/")  # LoRA stays float, so adapters stay swappable
_LAYER = re.compile(r"^/model/layers\.(\d+)/")


def _pack(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """q [K, N] -> MatMulNBits' B [N, K/block, block*bits/8], low nibble first."""
    k, n = q.shape
    qt = np.ascontiguousarray(q.T).reshape(n, k // block, block).astype(np.uint8)
    return qt if bits == 8 else (qt[..., 0::2] | (qt[..., 1::2] << 4)).astype(np.uint8)


def _per_block(scale: np.ndarray, block: int) -> np.ndarray:
    """[K/32, N] -> MatMulNBits' [N, K/block], repeating each 32-block's value over its sub-blocks."""
    return np.ascontiguousarray(np.repeat(scale, GGUF_BLOCK // block, axis=0).T).astype(np.float32)


class _Rewriter:
    def __init__(self, model, block: int, accuracy_level: int):
        self.graph, self.block, self.level = model.graph, block, accuracy_level
        self.init = {i.name: i for i in model.graph.initializer}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.new_inits: list = []
        self.sums: dict[str, str] = {}  # activation -> its block sums (shared by MatMuls reading it)
        self.counts = {"int4": 0, "int8": 0, "float": 0}
        self.dropped_nodes: set[int] = set()  # the embedding's Transpose and Gather, when replaced

    def add(self, array: np.ndarray, name: str) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def nbits(self, node, q, scale, bits: int, block: int, zero_point, out: str) -> list:
        """zero_point: one for every block, or [K/32, N] per GGUF block."""
        k, n = q.shape
        name = node.input[1]
        inputs = [
            node.input[0],
            self.add(_pack(q, bits, block), f"{name}_Q{bits}G{block}"),
            self.add(_per_block(scale, block), f"{name}_scale"),
        ]
        blocks = k // block
        zp = (
            np.full((n, blocks), zero_point, np.uint8)
            if np.isscalar(zero_point)
            else _per_block(zero_point, block).astype(np.uint8)
        )
        if bits == 4:
            zp = np.pad(zp, ((0, 0), (0, blocks % 2)))
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inputs.append(self.add(zp, f"{name}_zp"))
        return [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{node.name}_Q{bits}",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=self.level,
            )
        ]

    def int4(self, node, grid: Grid4) -> list:
        """x @ W = MatMulNBits(x; q, d, zp z) + blocksum(x) @ (m + d*z), z the integer nearest -m/d.

        Any z is exact; the nearest one centres the 4-bit part on the weights as they are, so the int8
        activations' rounding error meets weights of mean ~0: with z = 0 it met weights of mean 7.5d, and
        SmolLM2's agreement was 91.4% instead of 95.0% (KL 0.0152 instead of 0.0035)."""
        x, out, k = node.input[0], node.output[0], grid.q.shape[0]
        safe = np.where(grid.scale > 0, grid.scale, 1)
        z = np.clip(np.round(-grid.minimum / safe), 0, 15)
        offset = grid.minimum + grid.scale * z
        nodes = self.nbits(node, grid.q, grid.scale, 4, self.block, z, f"{out}_blocks")
        if x not in self.sums:
            shape = self.add(np.array([0, 0, k // GGUF_BLOCK, GGUF_BLOCK], np.int64), f"{node.input[1]}_sum_shape")
            axis = self.add(np.array([-1], np.int64), f"{node.input[1]}_sum_axis")
            self.sums[x] = f"{node.name}/BlockSum/output_0"
            nodes += [
                helper.make_node(
                    "Reshape",
                    [x, shape],
                    [f"{node.name}/BlockSum/Reshape/output_0"],
                    name=f"{node.name}/BlockSum/Reshape",
                ),
                helper.make_node(
                    "ReduceSum",
                    [f"{node.name}/BlockSum/Reshape/output_0", axis],
                    [self.sums[x]],
                    name=f"{node.name}/BlockSum",
                    keepdims=0,
                ),
            ]
        minimum = self.add(offset.astype(np.float32), f"{node.input[1]}_minimum")
        nodes += [
            helper.make_node("MatMul", [self.sums[x], minimum], [f"{out}_minimum"], name=f"{node.name}/Minimum"),
            helper.make_node("Add", [f"{out}_blocks", f"{out}_minimum"], [out], name=f"{node.name}/Add"),
        ]
        self.counts["int4"] += 1
        return nodes

    def int8(self, node, grid: Grid8) -> list:
        nodes = self.nbits(node, (grid.q + 128).astype(np.uint8), grid.scale, 8, GGUF_BLOCK, 128, node.output[0])
        self.counts["int8"] += 1
        return nodes + self._shared_embedding(node)

    def _shared_embedding(self, node) -> list:
        """The builder's tied embedding is Gather(Transpose(lm_head weight)): read the 8-bit bytes instead."""
        users = [u for u in self.consumers.get(node.input[1], []) if u is not node]
        if not (len(users) == 1 and users[0].op_type == "Transpose"):
            return []
        transpose = users[0]
        gathers = self.consumers.get(transpose.output[0], [])
        if not (len(gathers) == 1 and gathers[0].op_type == "Gather"):
            return []
        gather, (n, k) = gathers[0], self.init[node.input[1]].dims[::-1]
        name = node.input[1]
        shape = self.add(np.array([n, k], np.int64), f"{name}_embedding_shape")
        self.dropped_nodes.update({id(transpose), id(gather)})
        return [
            helper.make_node(
                "Reshape",
                [f"{name}_Q8G{GGUF_BLOCK}", shape],
                [f"{gather.name}/Reshape/output_0"],
                name=f"{gather.name}/Reshape",
            ),
            helper.make_node(
                "GatherBlockQuantized",
                [f"{gather.name}/Reshape/output_0", gather.input[1], f"{name}_scale", f"{name}_zp"],
                list(gather.output),
                name=f"{gather.name}BlockQuantized",
                domain="com.microsoft",
                bits=8,
                block_size=GGUF_BLOCK,
                gather_axis=0,
                quantize_axis=1,
            ),
        ]


def keep_gguf_blocks(
    model,
    block_size: int = 32,
    accuracy_level: int = 4,
    float_layers: tuple[int, ...] = (),
    nodes_to_exclude: tuple[str, ...] = (),
) -> dict[str, int]:
    """Rewrite `model` (an onnx ModelProto, weights loaded) in place; return how many MatMuls became what.

    Raises NotOnGrid when no MatMul (other than LoRA and excluded ones) is on a GGUF grid."""
    if block_size not in GGUF_BLOCK_SIZES:
        raise ValueError(
            f"block_size {block_size} cannot hold a {GGUF_BLOCK}-block exactly; use one of {GGUF_BLOCK_SIZES}"
        )
    r = _Rewriter(model, block_size, accuracy_level)
    rewritten: dict[int, list] = {}
    off_grid = []
    for node in model.graph.node:
        if (
            node.op_type != "MatMul"
            or node.input[1] not in r.init
            or _LORA.search(node.name)
            or node.name in nodes_to_exclude
        ):
            continue
        layer = _LAYER.match(node.name)
        if layer and int(layer.group(1)) in float_layers:
            r.counts["float"] += 1
            continue
        w = numpy_helper.to_array(r.init[node.input[1]])
        grid = grid4(w)
        if grid is not None:
            rewritten[id(node)] = r.int4(node, grid)
        elif (grid8_ := grid8(w)) is not None:
            rewritten[id(node)] = r.int8(node, grid8_)
        else:
            off_grid.append(node.name)
    if not rewritten:
        raise NotOnGrid(
            f"no weight is on a GGUF block grid (Q4_0, Q4_1 or Q8_0, blocks of {GGUF_BLOCK}); "
            f"first MatMul looked at: {off_grid[0] if off_grid else 'none'}"
        )
    r.counts["float"] += len(off_grid)
    if off_grid:
        logger.info("GgufBlocks left %d MatMuls off any grid in fp32: %s", len(off_grid), ", ".join(off_grid[:5]))
    nodes = []
    for node in model.graph.node:
        if id(node) in r.dropped_nodes:
            continue
        nodes.extend(rewritten.get(id(node), [node]))
    replaced = {n.input[1] for n in model.graph.node if id(n) in rewritten}
    still_read = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + r.new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return r.counts


class GgufBlocks(Pass):
    """Quantize MatMul weights that lie on a GGUF block grid to MatMulNBits holding exactly those blocks."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "block_size": PassConfigParam(
                type_=int,
                default_value=32,
                description=f"MatMulNBits block, one of {GGUF_BLOCK_SIZES} (exact either way).",
            ),
            "accuracy_level": PassConfigParam(
                type_=int, default_value=4, description="MatMulNBits accuracy level (4: int8 activations)."
            ),
            "float_layers": PassConfigParam(
                type_=list[int],
                default_value=[],
                description="Decoder layers whose MatMuls stay fp32 (the most sensitive).",
            ),
            "nodes_to_exclude": PassConfigParam(
                type_=list[str], default_value=[], description="MatMul nodes to leave fp32 (LoRA nodes always are)."
            ),
            **get_external_data_config(),
        }

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        proto = onnx.load(str(model.model_path), load_external_data=True)
        counts = keep_gguf_blocks(
            proto, config.block_size, config.accuracy_level, tuple(config.float_layers), tuple(config.nodes_to_exclude)
        )
        logger.info("GgufBlocks: %s", counts)
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        return model_proto_to_olive_model(proto, output_model_path, config)
