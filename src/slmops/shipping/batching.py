"""One ONNX Runtime session that decodes many sequences at once, each with its own adapter.

The bundle's graph takes each LoRA pair as inputs A [in, r] and B [r, out]. Here every loaded
adapter's A matrices are laid side by side and its B matrices stacked (rank columns padded to one
width per adapter), and a `lora_mask` input [batch, 1, R] is multiplied in between: a row keeps
the rank columns of its own adapter and zeroes the rest, so one MatMul pair serves a batch that
mixes the base and any adapters (Punica's idea, on the CPU). The zeroed columns add exact zeros,
so a row's result does not depend on what shares its batch.

The KV cache is one buffer per layer, [slots, kv_heads, max_len, head_size], shared between the
past and present of GroupQueryAttention (as onnxruntime-genai does): a decode step binds the first
n rows, a prefill binds the one row it fills. Rows of one batch may have different lengths; the
attention mask is right-padded and GroupQueryAttention reads each row's own length from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from slmops.shipping.manifest import BundleError

MASK = "lora_mask"
LAST = "last_position"


@dataclass(frozen=True)
class Layout:
    """What the decoder graph's genai_config says about its KV cache."""

    layers: int
    kv_heads: int
    head_size: int
    past: tuple[str, str]  # name patterns with %d
    present: tuple[str, str]

    @classmethod
    def read(cls, folder: Path) -> Layout:
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        return cls(
            layers=int(decoder["num_hidden_layers"]),
            kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]),
            past=(inputs["past_key_names"], inputs["past_value_names"]),
            present=(outputs["present_key_names"], outputs["present_value_names"]),
        )


def add_lora_mask(graph) -> dict[str, tuple[int, int]]:
    """Put a Mul by `lora_mask` between each LoRA A and B MatMul of `graph` (in place).

    Returns the graph's LoRA inputs as name -> (rows, cols), 0 where the rank goes."""
    from onnx import TensorProto, helper

    from slmops.shipping.adapters import lora_inputs

    lora = lora_inputs(graph)
    if not lora:
        return lora
    nodes = list(graph.node)
    a_nodes = {
        n.output[0]: n
        for n in nodes
        if n.op_type == "MatMul" and len(n.input) == 2 and ".lora_A." in n.input[1] and n.input[1] in lora
    }
    order = []
    for node in nodes:
        node.input[:] = [f"{x}/masked" if x in a_nodes else x for x in node.input]
        order.append(node)
        if node.output and node.output[0] in a_nodes:
            out = node.output[0]
            order.append(helper.make_node("Mul", [out, MASK], [f"{out}/masked"], name=f"{node.name}/lora_mask"))
    del graph.node[:]
    graph.node.extend(order)
    graph.input.append(helper.make_tensor_value_info(MASK, TensorProto.FLOAT, ["batch_size", 1, "lora_rank"]))
    return lora


def read_onnx_adapter(path: Path) -> dict[str, np.ndarray]:
    """An `.onnx_adapter` file's tensors, copied out (the arrays ONNX Runtime hands back die with the reader)."""
    import onnxruntime as ort

    reader = ort.AdapterFormat.read_adapter(str(path))
    return {name: np.array(value.numpy(), copy=True) for name, value in reader.get_parameters().items()}


def add_last_position(graph) -> bool:
    """Make the graph's logits come from each row's own last position (`last_position` [batch]), not
    the last column of the batch (in place): rows of one prefill can then have different lengths.

    The model builder keeps only the last position before the LM head with a Gather (index -1,
    axis 1); that Gather becomes GatherElements at per-row positions. False if the graph has no such
    Gather (prefills then run one at a time)."""
    from onnx import TensorProto, helper, numpy_helper

    tensors = {i.name: i for i in graph.initializer if i.data_location != TensorProto.EXTERNAL}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t

    def minus_one(name: str) -> bool:
        value = numpy_helper.to_array(tensors[name]) if name in tensors else None
        return value is not None and value.size == 1 and int(value.reshape(-1)[0]) == -1

    gathers = [
        n
        for n in graph.node
        if n.op_type == "Gather" and any(a.name == "axis" and a.i == 1 for a in n.attribute) and minus_one(n.input[1])
    ]
    if len(gathers) != 1:
        return False
    gather = gathers[0]
    hidden, out = gather.input[0], gather.output[0]
    prefix = f"{gather.name}/per_row"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray([1, 2], dtype=np.int64), f"{prefix}/axes"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), f"{prefix}/axis1"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), f"{prefix}/two"),
            numpy_helper.from_array(np.asarray([3], dtype=np.int64), f"{prefix}/three"),
            numpy_helper.from_array(np.asarray([1, 1], dtype=np.int64), f"{prefix}/ones"),
        ]
    )
    # the row's index [B, 1, 1], broadcast to [B, 1, hidden] (the width read from the hidden states)
    nodes = [
        helper.make_node("Unsqueeze", [LAST, f"{prefix}/axes"], [f"{prefix}/index"]),
        helper.make_node("Shape", [hidden], [f"{prefix}/shape"]),
        helper.make_node("Slice", [f"{prefix}/shape", f"{prefix}/two", f"{prefix}/three"], [f"{prefix}/width"]),
        helper.make_node("Concat", [f"{prefix}/ones", f"{prefix}/width"], [f"{prefix}/target"], axis=0),
        helper.make_node("Expand", [f"{prefix}/index", f"{prefix}/target"], [f"{prefix}/indices"]),
        helper.make_node("GatherElements", [hidden, f"{prefix}/indices"], [f"{prefix}/rows"], axis=1),
        helper.make_node("Squeeze", [f"{prefix}/rows", f"{prefix}/axis1"], [out]),  # [B, hidden], as before
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.input.append(helper.make_tensor_value_info(LAST, TensorProto.INT64, ["batch_size"]))
    return True


class AdapterClash(BundleError):
    pass


class LoraStack:
    """The loaded adapters as one set of graph inputs, and which rank columns belong to which.

    The width (rank columns) is fixed when the stack is made: a GEMM's rounding can depend on its
    width, so adapters loaded or unloaded later must not change it, or they would change the
    answers of requests on other adapters. An adapter takes the first free run of columns that
    fits, and keeps it until it is removed."""

    def __init__(self, inputs: dict[str, tuple[int, int]], width: int):
        self.inputs, self.width = inputs, max(width, 1)
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.ids: dict[Optional[str], int] = {None: 0}  # a new id per load: a reloaded name is another adapter
        self._next_id = 1
        self.values = {key: self._zeros(key) for key in inputs}  # changed in place: the OrtValues share them
        self.bound = {key: _ort_value(value) for key, value in self.values.items()}

    def _zeros(self, key: str) -> np.ndarray:
        rows, cols = self.inputs[key]
        return np.zeros((rows, self.width) if ".lora_A." in key else (self.width, cols), dtype=np.float32)

    def check(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        """BundleError unless `tensors` are LoRA inputs of this graph with the graph's shapes."""
        unknown = sorted(set(tensors) - set(self.inputs))
        if unknown:
            raise BundleError(
                f"adapter '{name}' has {len(unknown)} tensor(s) the bundle's graph has no input for "
                f"(first: {unknown[0]}); export a bundle whose graph covers its modules"
            )
        for key, value in tensors.items():
            rows, cols = self.inputs[key]
            got = value.shape
            if not np.isfinite(value).all():  # the mask multiplies by 0, and 0 x inf would poison every row
                raise BundleError(f"adapter '{name}': {key} holds NaN or infinite values")
            if value.ndim != 2 or (rows and got[0] != rows) or (cols and got[1] != cols):
                raise BundleError(
                    f"adapter '{name}': {key} is {list(got)}, the graph takes "
                    f"[{rows or 'r'}, {cols or 'r'}]; it was made for another base model"
                )

    @staticmethod
    def columns(tensors: dict[str, np.ndarray]) -> int:
        """The rank columns an adapter takes: its widest input (a fused q/k/v input holds three ranks)."""
        return max([v.shape[1] if ".lora_A." in k else v.shape[0] for k, v in tensors.items()] or [1])

    def free(self) -> int:
        return self.width - sum(end - start for start, end in self.offsets.values())

    def add(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        if name in self.adapters:
            raise AdapterClash(f"adapter '{name}' is already loaded; DELETE it first")
        self.check(name, tensors)
        need = self.columns(tensors)
        start = self._gap(need)
        if start is None:
            raise BundleError(
                f"no room for adapter '{name}': it takes {need} rank columns, {self.free()} of "
                f"{self.width} are free (and not all in one run); unload an adapter, or restart "
                "with a larger --adapter-capacity"
            )
        for key, part in tensors.items():
            target = self.values[key]
            if ".lora_A." in key:
                target[:, start : start + part.shape[1]] = part
            else:
                target[start : start + part.shape[0], :] = part
        self.adapters[name] = tensors
        self.offsets[name] = (start, start + need)
        self.ids[name], self._next_id = self._next_id, self._next_id + 1

    def remove(self, name: str) -> None:
        start, end = self.offsets.pop(name)
        del self.adapters[name], self.ids[name]
        for key, target in self.values.items():
            if ".lora_A." in key:
                target[:, start:end] = 0
            else:
                target[start:end, :] = 0

    def _gap(self, need: int) -> Optional[int]:
        taken = sorted(self.offsets.values())
        cursor = 0
        for start, end in taken + [(self.width, self.width)]:
            if start - cursor >= need:
                return cursor
            cursor = max(cursor, end)
        return None

    def mask(self, adapters: list[Optional[str]]) -> np.ndarray:
        out = np.zeros((len(adapters), 1, self.width), dtype=np.float32)
        for row, name in enumerate(adapters):
            if name is not None:
                start, end = self.offsets[name]
                out[row, 0, start:end] = 1.0
        return out


def _ort_value(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU it wraps the array's memory: no copy


class BatchModel:
    """The bundle's decoder with a LoRA mask, and a KV cache of `slots` rows of up to `max_len` tokens.

    The cache rows start short and grow (doubling, up to `max_len`) when a sequence needs more:
    the memory follows the longest sequence served, not the model's context."""

    def __init__(self, folder: Path, slots: int, max_len: int, threads: Optional[int] = None, lora_width: int = 256):
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        self.stack = LoraStack(add_lora_mask(proto.graph), lora_width)
        self.per_row = add_last_position(proto.graph)  # can rows of one prefill differ in length
        self.layout = layout = Layout.read(folder)
        dtypes = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
        self.kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtypes[layout.past[0] % 0])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        # the graph is passed as bytes; its weights stay in the bundle's external data file
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.slots, self.max_len = slots, max_len
        self.names = [
            (layout.past[side] % layer, layout.present[side] % layer)
            for layer in range(layout.layers)
            for side in (0, 1)
        ]
        self.cache: list[np.ndarray] = []
        self._bindings: dict[tuple[int, int], object] = {}
        self._allocate(min(256, max_len))

    @property
    def bytes_per_token(self) -> int:
        """KV cache bytes one token of one sequence takes."""
        layout = self.layout
        return len(self.names) * layout.kv_heads * layout.head_size * np.dtype(self.kv_dtype).itemsize

    @property
    def length(self) -> int:
        """Positions each cache row holds now."""
        return self.cache[0].shape[2]

    def _allocate(self, length: int) -> None:
        old, layout = self.cache, self.layout
        shape = (self.slots, layout.kv_heads, length, layout.head_size)
        self.cache = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.names]
        for new, buffer in zip(self.cache, old):
            new[:, :, : buffer.shape[2]] = buffer
        self._bindings = {}

    def reserve(self, length: int) -> None:
        """Make every cache row hold at least `length` positions (copying what they hold)."""
        if length > self.length:
            self._allocate(min(self.max_len, max(length, 2 * self.length)))

    def _binding(self, start: int, count: int):
        """An IOBinding with rows [start, start+count) of the cache and the LoRA stack bound, made once
        per row range and cache size and kept: a step binds only its small per-step inputs."""
        key = (start, count)
        if key not in self._bindings:
            binding = self.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() lists outputs in the order they were bound
            for name, value in self.stack.bound.items():  # changed in place by the stack: bound once
                binding.bind_ortvalue_input(name, value)
            for (past, present), buffer in zip(self.names, self.cache):
                value = _ort_value(buffer[start : start + count])  # a view: no copy
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)  # shared: GQA writes the new K/V in place
            self._bindings[key] = binding
        return self._bindings[key]

    def run(
        self,
        start: int,
        tokens: np.ndarray,
        lengths: list[int],
        adapters: list[Optional[str]],
        fed: Optional[list[int]] = None,
    ) -> np.ndarray:
        """Feed `tokens` [n, s] to cache rows start..start+n-1, whose lengths become `lengths`; logits [n, vocab].

        `fed` is how many of each row's s tokens are real (a prefill's rows are right-padded to the
        longest); each row's logits are those of its last real token."""
        n, width = tokens.shape
        fed = fed or [width] * n
        if width > 1 and len(set(fed)) > 1 and not self.per_row:
            raise ValueError("this graph gives the last column's logits only: prefill rows of one length")
        self.reserve(max(lengths))
        binding = self._binding(start, n)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        mask = np.zeros((n, max(lengths)), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        binding.bind_cpu_input("attention_mask", mask)
        if self.per_row:
            binding.bind_cpu_input(LAST, np.asarray(fed, dtype=np.int64) - 1)
        if self.stack.inputs:
            binding.bind_cpu_input(MASK, self.stack.mask(adapters))
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()  # only the logits: the cache is already where it belongs
        return logits.reshape(n, -1, logits.shape[-1])[:, -1, :]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a row's cache (its first `length` positions) to another row."""
        for buffer in self.cache:
            buffer[target, :, :length] = buffer[source, :, :length]
