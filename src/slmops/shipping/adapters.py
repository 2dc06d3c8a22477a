"""PEFT LoRA adapters as export sees them: what they cover, whether they fit a base, their ONNX tensors.

The model builder names a LoRA MatMul's weight input `model.layers.{i}.{attn|mlp}.{proj}.lora_{A|B}.MatMul.weight`
and stores it transposed, with lora_B already multiplied by the adapter's scaling. An adapter file
written here for such a graph must use exactly those names, layouts and scales.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slmops.core.architectures import PACKED, UNPACKED
from slmops.core.errors import RunError

# PEFT module name -> (block in the builder's graph, projection). The graph always has these, unpacked.
MODULES = {m: ("attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp", m) for m in UNPACKED}
_PEFT_BLOCK = {"attn": "self_attn", "mlp": "mlp"}
# Projections that read the same input, which slmops' FuseLoRA pass packs into one base MatMul with
# one LoRA pair: group -> (block, members in output order). A model that keeps a group in one Linear
# (Phi-3) trains one LoRA on it; its A is the group's A and its B the group's B as they are.
FUSED_GROUPS = {group: (MODULES[parts[0]][0], parts) for group, parts in PACKED.items()}
TRAINABLE = (*MODULES, *FUSED_GROUPS)  # what an adapter may train: a graph projection or a packed group
_FUSED_INPUT = re.compile(
    rf"^model\.layers\.(\d+)\.(?:attn|mlp)\.({'|'.join(FUSED_GROUPS)})\.lora_([AB])\.MatMul\.weight$"
)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def block(module: str) -> str:
    return FUSED_GROUPS[module][0] if module in FUSED_GROUPS else MODULES[module][0]


def members(module: str) -> tuple[str, ...]:
    """The graph projections a trained module covers: a packed group's members, else itself."""
    return FUSED_GROUPS[module][1] if module in FUSED_GROUPS else (module,)


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter on disk, with the provenance slmops recorded next to it (if any)."""

    name: str
    path: Path  # folder with adapter_config.json and adapter_model.safetensors
    config: dict
    run: Optional[dict]  # run.json of the slmops finetune that produced it
    shapes: dict[tuple[int, str, str], tuple[int, ...]]  # (layer, module, "A"|"B") -> tensor shape

    @property
    def modules(self) -> set[str]:
        """The modules it trains, as PEFT names them (a packed group by its own name)."""
        return {module for _, module, _ in self.shapes}

    @property
    def graph_modules(self) -> set[str]:
        """The graph projections it needs LoRA inputs on: a packed group's members."""
        return {part for module in self.modules for part in members(module)}

    @property
    def layers(self) -> set[int]:
        return {layer for layer, _, _ in self.shapes}

    @property
    def rank(self) -> int:
        return max(shape[0] for (_, _, ab), shape in self.shapes.items() if ab == "A")


def load_adapter(name: str, path: Path) -> Adapter:
    """Read an adapter folder, or an `slmops finetune` output folder (its adapter/ and run.json)."""
    path = Path(path).expanduser()
    run = None
    if (path / "sweep.json").is_file():  # an `slmops sweep` folder: its best trial
        from slmops.training.outputs import best_trial_folder

        path = best_trial_folder(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        if (path / "run.json").is_file():
            run = json.loads((path / "run.json").read_text())
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise RunError(
            f"adapter '{name}': '{path}' has no adapter_config.json; pass a PEFT adapter folder "
            "or an `slmops finetune` output folder"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    _check_supported(name, config)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise RunError(
            f"adapter '{name}': '{path}' has no adapter_model.safetensors; save the adapter with "
            "safe_serialization=True"
        )
    return Adapter(name, path.resolve(), config, run, _shapes(name, weights))


def _check_supported(name: str, config: dict) -> None:
    unsupported = [
        (config.get("peft_type") != "LORA", f"peft_type is {config.get('peft_type')}, only LORA adapters export"),
        (bool(config.get("use_dora")), "DoRA adapters cannot be applied as separate ONNX adapters; merge it instead"),
        (
            bool(config.get("modules_to_save")),
            f"it saves whole modules ({config.get('modules_to_save')}), which "
            "an ONNX adapter cannot carry; retrain without modules_to_save",
        ),
        (config.get("bias", "none") != "none" or bool(config.get("lora_bias")), "LoRA biases are not supported"),
    ]
    for bad, why in unsupported:
        if bad:
            raise RunError(f"adapter '{name}': {why}")


def _shapes(name: str, weights: Path) -> dict:
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            match = _KEY.search(key)
            if not match or match.group(2) not in TRAINABLE:
                raise RunError(
                    f"adapter '{name}': tensor '{key}' is not a LoRA weight of a linear layer the "
                    f"exporter handles ({', '.join(TRAINABLE)}); retrain with target_modules among those"
                )
            shapes[(int(match.group(1)), match.group(2), match.group(3))] = tuple(fh.get_slice(key).get_shape())
    if not shapes:
        raise RunError(f"adapter '{name}': {weights} holds no LoRA weights")
    return shapes


def lora_inputs(graph) -> dict[str, tuple[int, int]]:
    """Every LoRA input of an ONNX graph -> its fixed size: (in, 0) for lora_A [in, r], (0, out) for lora_B [r, out]."""
    inputs = {}
    for value in graph.input:
        if ".lora_A." in value.name or ".lora_B." in value.name:
            rows, cols = (d.dim_value for d in value.type.tensor_type.shape.dim)  # r is symbolic: dim_value 0
            inputs[value.name] = (rows, 0) if ".lora_A." in value.name else (0, cols)
    return inputs


def graph_input(layer: int, module: str, ab: str) -> str:
    block, proj = MODULES[module]
    return f"model.layers.{layer}.{block}.{proj}.lora_{ab}.MatMul.weight"


def fused_input(layer: int, module: str, ab: str) -> Optional[str]:
    """The FuseLoRA graph input that carries this module's LoRA, if its group is fused."""
    for group, (block, members) in FUSED_GROUPS.items():
        if module in members:
            return f"model.layers.{layer}.{block}.{group}.lora_{ab}.MatMul.weight"
    return None


def graph_node(layer: int, module: str, ab: str) -> str:
    block, proj = MODULES[module]
    return f"/model/layers.{layer}/{block}/{proj}/lora_{ab}/MatMul"


def base_shapes(model_path: Path) -> tuple[int, dict[tuple[int, str], tuple[int, int]]]:
    """(number of layers, (layer, module) -> (in_features, out_features)) from the base's safetensors headers.

    A packed group (Phi-3's qkv_proj, gate_up_proj) is listed under its own name and, cut by the
    config's head sizes, under each member's: the graph the builder makes has the members."""
    from safetensors import safe_open

    config = json.loads((Path(model_path) / "config.json").read_text())
    n_layers = int(config.get("num_hidden_layers", 0))
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
    shapes = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                match = pattern.search(key)
                if match and match.group(3) in TRAINABLE:
                    out_f, in_f = fh.get_slice(key).get_shape()[:2]
                    shapes[(int(match.group(1)), match.group(3))] = (int(in_f), int(out_f))
    for (layer, module), (in_f, out_f) in list(shapes.items()):
        if module in FUSED_GROUPS:
            for part, width in zip(members(module), member_widths(config, module, out_f)):
                shapes[(layer, part)] = (in_f, width)
    return n_layers, shapes


def member_widths(config: dict, group: str, out_f: int) -> tuple[int, ...]:
    """How a packed group's output rows divide among its members: q, k, v by heads; gate and up in halves."""
    if group == "gate_up_proj":
        return (out_f // 2, out_f // 2)
    heads, kv_heads = (
        int(config["num_attention_heads"]),
        int(config.get("num_key_value_heads") or config["num_attention_heads"]),
    )
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if sum(widths) != out_f:
        raise RunError(
            f"{group} has {out_f} outputs, not the {sum(widths)} its config's heads make; the model is not a Phi-3 layout"
        )
    return widths


def check_fits(adapter: Adapter, n_layers: int, shapes: dict[tuple[int, str], tuple[int, int]], base: str) -> None:
    """Refuse an adapter whose layers or tensor shapes do not fit the base (trained on another model)."""
    packed = {part: group for (_, group) in shapes if group in FUSED_GROUPS for part in members(group)}
    for (layer, module, ab), shape in sorted(adapter.shapes.items()):
        where = f"layer {layer} {module} lora_{ab}"
        if module in packed:  # the base has no such Linear: PEFT could not apply it for merging or parity
            raise RunError(
                f"adapter '{adapter.name}' trains {module}, which base '{base}' packs into {packed[module]}; "
                "it was trained on another model layout"
            )
        if (layer, module) not in shapes:
            raise RunError(
                f"adapter '{adapter.name}' does not fit base '{base}': {where} has no matching layer "
                f"(the base has {n_layers} layers); it was trained on another model"
            )
        in_f, out_f = shapes[(layer, module)]
        expected = in_f if ab == "A" else out_f
        got = shape[1] if ab == "A" else shape[0]
        if len(shape) != 2 or got != expected:
            raise RunError(
                f"adapter '{adapter.name}' does not fit base '{base}': {where} has shape {list(shape)}, "
                f"the base needs {f'[r, {expected}]' if ab == 'A' else f'[{expected}, r]'}; "
                "it was trained on another model"
            )


def scaling(config: dict, layer: int, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), honouring the patterns."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", f"layers.{layer}.{_PEFT_BLOCK[block(module)]}.{module}"):
            alpha = float(value)
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def onnx_tensors(
    adapter: Adapter, graph_inputs: dict[str, tuple[int, int]], shapes: dict[tuple[int, str], tuple[int, int]]
) -> dict:
    """The adapter as numpy arrays named after the graph's LoRA inputs, zero-padded where it has no weights.

    `graph_inputs` maps every LoRA input of the graph to (in, out) of its MatMul; `shapes` is the
    base's (layer, module) -> (in, out). A per-module input takes the module's A or B, zero-padded
    up to the adapter's rank (rank_pattern) or all zeros if the adapter leaves the module out. A
    fused group's input (FuseLoRA) takes the trained members' A side by side and their B on the
    block diagonal, each member's B in its own output columns. A packed group's LoRA (Phi-3) is
    already in that layout; for per-member inputs its A goes to each member and its B is cut by rows.
    """
    import numpy as np

    weights = _matmul_weights(adapter)
    for layer, module, ab in weights:
        for part in members(module):
            if graph_input(layer, part, ab) not in graph_inputs and fused_input(layer, part, ab) not in graph_inputs:
                raise RunError(
                    f"adapter '{adapter.name}' trains {module} in layer {layer}, which the bundle's "
                    "graph has no LoRA input for; export again with this adapter (or --lora-modules "
                    "covering it) so the base graph includes it"
                )
    rank, values = adapter.rank, {}
    by_name = {graph_input(*key): w for key, w in _unpacked(weights, shapes).items()}
    for name, (in_f, out_f) in graph_inputs.items():
        is_a = ".lora_A." in name
        fused = _FUSED_INPUT.match(name)
        if fused:
            values[name] = _fused_tensor(
                weights,
                int(fused.group(1)),
                fused.group(2),
                is_a,
                shapes,
                np.zeros((in_f, rank) if is_a else (rank, out_f), dtype=np.float32),
            )
            continue
        full = np.zeros((in_f, rank) if is_a else (rank, out_f), dtype=np.float32)
        have = by_name.get(name)
        if have is not None:
            if is_a:
                full[:, : have.shape[1]] = have
            else:
                full[: have.shape[0], :] = have
        values[name] = full
    return values


def _matmul_weights(adapter: Adapter) -> dict:
    """(layer, module, "A"|"B") -> float32 array in MatMul layout ([in, r], [r, out]), B times PEFT's scaling."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(adapter.path / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            match = _KEY.search(key)
            assert match is not None  # load_adapter (_shapes) checked every key
            layer, module, ab = int(match.group(1)), match.group(2), match.group(3)
            tensor = fh.get_tensor(key).float()
            if ab == "B":
                tensor = tensor * scaling(adapter.config, layer, module, tensor.shape[1])
            out[(layer, module, ab)] = tensor.T.contiguous().numpy()
    return out


def _fused_tensor(weights: dict, layer: int, group: str, is_a: bool, shapes: dict, empty):
    """One fused group's A ([in, sum r]) or B ([sum r, sum out], block-diagonal); `empty` if no member is trained."""
    import numpy as np

    if (layer, group, "A") in weights:  # trained packed, as the fused graph packs it
        return weights[(layer, group, "A" if is_a else "B")]
    members = FUSED_GROUPS[group][1]
    trained = [m for m in members if (layer, m, "A") in weights]
    if not trained:
        return empty
    if is_a:
        return np.concatenate([weights[(layer, m, "A")] for m in trained], axis=1)
    return block_diagonal([weights.get((layer, m, "B")) for m in members], [shapes[(layer, m)][1] for m in members])


def _unpacked(weights: dict, shapes: dict) -> dict:
    """The weights with each packed group's LoRA given to its members: the same A, B's own output columns."""
    out = {}
    for (layer, module, ab), w in weights.items():
        if module not in FUSED_GROUPS:
            out[(layer, module, ab)] = w
            continue
        col = 0
        for part in members(module):
            width = shapes[(layer, part)][1]
            out[(layer, part, ab)] = w if ab == "A" else w[:, col : col + width]
            col += width
    return out


def block_diagonal(parts: list, widths: list[int]):
    """Stack B matrices ([r_i, out_i], or None for an untrained member) into [sum r_i, sum widths]:
    each in its own rows and its member's columns, zeros elsewhere."""
    import numpy as np

    present = [p for p in parts if p is not None]
    b = np.zeros((sum(p.shape[0] for p in present), sum(widths)), dtype=present[0].dtype)
    row = col = 0
    for part, width in zip(parts, widths):
        if part is not None:
            b[row : row + part.shape[0], col : col + width] = part
            row += part.shape[0]
        col += width
    return b


def base_modules(modules: set[str], shapes: dict[tuple[int, str], tuple[int, int]]) -> list[str]:
    """The base's own Linear names that cover these graph projections (a packed group where the base packs them)."""
    packed = {g for (_, g) in shapes if g in FUSED_GROUPS}
    return sorted({next((g for g in packed if m in members(g)), m) for m in modules})


def graph_modules(modules: set[str], shapes: dict[tuple[int, str], tuple[int, int]]) -> set[str]:
    """The graph projections that get LoRA inputs: where the base packs a group, all of its members."""
    return {part for module in base_modules(modules, shapes) for part in members(module)}


def union_adapter(
    adapters: list[Adapter],
    modules: set[str],
    n_layers: int,
    shapes: dict[tuple[int, str], tuple[int, int]],
    out: Path,
    base: str,
) -> Path:
    """A zero LoRA over `modules` of every layer: the builder turns it into the graph every adapter fits."""
    import torch
    from safetensors.torch import save_file

    rank = 8  # any rank: the exported graph takes LoRA weights of any rank as inputs
    out.mkdir(parents=True)
    tensors = {}
    trained = base_modules(modules, shapes)
    for layer in range(n_layers):
        for module in trained:
            in_f, out_f = shapes[(layer, module)]
            prefix = f"base_model.model.model.layers.{layer}.{_PEFT_BLOCK[block(module)]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, in_f)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(out_f, rank)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": trained,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
