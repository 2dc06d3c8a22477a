"""Each architecture slmops supports, through the whole path (the README's architecture table).

For every family: a tiny random model of its architecture with the family's real chat template (as
TRL ships it) and its distinguishing settings; two LoRA adapters of different ranks trained by
`slmops finetune` on every linear module (Phi-3's packed qkv_proj and gate_up_proj included); an fp32
and an int4 export with both; generation with each adapter; `verify --parity` (fp32 within 1e-3 of
PyTorch + PEFT); and `bench`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SFT_DATA, Chat, build_tiny_model, corpus_texts, write_recipe
from slmops.cli import cli
from slmops.core.architectures import ARCHITECTURES
from test_export import make_adapter

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
# Mistral-7B-Instruct's template (v0.1, as llama.cpp and the hub ship it); TRL has none for Mistral.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def trl_template(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text()


@dataclass(frozen=True)
class Family:
    arch: str  # conftest.ARCHS key
    chat: Chat
    config: dict = field(default_factory=dict)  # what sets the family apart, at tiny scale


FAMILIES = {
    "llama": Family(  # Llama 3.2: llama3 RoPE scaling, tied embeddings
        "llama",
        Chat(
            trl_template("llama3_2"),
            (
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|finetune_right_pad_id|>",
            ),
            "<|begin_of_text|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        },
    ),
    "mistral": Family(
        "mistral", Chat(MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>"), {"sliding_window": None}
    ),
    "qwen2": Family(  # Qwen2.5: q/k/v biases, a default system prompt
        "qwen2",
        Chat(
            trl_template("qwen2_5"),
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            None,
            "<|im_end|>",
            "<|endoftext|>",
        ),
    ),
    "qwen3": Family(  # Qwen3: q/k RMS norms, an explicit head_dim, thinking tags
        "qwen3",
        Chat(
            trl_template("qwen3"),
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
            None,
            "<|im_end|>",
            "<|endoftext|>",
        ),
        {"head_dim": 32},
    ),
    "phi3": Family(  # Phi-4-mini: packed qkv_proj / gate_up_proj, partial rotary (0.75), tied embeddings
        "phi3",
        Chat(
            trl_template("phi3_5"),
            ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            None,
            "<|end|>",
            "<|endoftext|>",
        ),
        # head_dim 64, so the rotary part (48) is a multiple of 16 as onnxruntime's kernel needs (Phi-4-mini: 96)
        {
            "partial_rotary_factor": 0.75,
            "tie_word_embeddings": True,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
    ),
    "gemma2": Family(  # Gemma 2: a sliding window shorter than the test texts, soft-capped logits
        "gemma2",
        Chat(
            trl_template("gemma"),
            ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
            "<bos>",
            "<end_of_turn>",
            "<pad>",
        ),
        {"sliding_window": 16, "head_dim": 16, "query_pre_attn_scalar": 16},
    ),
}
ARCH_OF = {a.model_type: a for a in ARCHITECTURES.values()}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exc_info and not isinstance(result.exc_info[1], SystemExit):  # a crash: show where
        raise result.exc_info[1].with_traceback(result.exc_info[2])
    return result.exit_code, (result.stdout if result.exit_code in (0, 1) else result.output).strip()


def family_model(family: Family, folder: Path) -> Path:
    return build_tiny_model(folder, corpus_texts(), arch=family.arch, chat=family.chat, **family.config)


def train(model: Path, out: Path, rank: int, modules: tuple[str, ...], tmp: Path) -> Path:
    recipe = write_recipe(
        tmp / f"r{rank}.yaml",
        f"""name: arch-r{rank}
method: lora
model: {{name: {model}}}
data: {{file: {SFT_DATA}, format: alpaca, eval_split: 0.2, max_seq_len: 64}}
lora: {{r: {rank}, alpha: {2 * rank}, dropout: 0.0, target_modules: [{", ".join(modules)}]}}
training: {{max_steps: 2, batch_size: 2, learning_rate: 0.05, dtype: float32, seed: {rank}}}
""",
    )
    code, output = run("finetune", "--recipe", recipe, "-o", out)
    assert code == 0, output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_whole_path(name, tmp_path):
    family = FAMILIES[name]
    arch = ARCH_OF[family.arch]
    model = family_model(family, tmp_path / "model")
    # every linear module, packed ones included; two ranks
    small = train(model, tmp_path / "small", 2, arch.modules, tmp_path)
    large = train(model, tmp_path / "large", 8, arch.modules, tmp_path)
    trained = json.loads((small / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(trained) == sorted(arch.modules)

    for precision in ("fp32", "int4"):
        bundle = tmp_path / precision
        code, out = run(
            "export", "-m", model, "-a", f"small={small}", "-a", f"large={large}", "-p", precision, "-o", bundle
        )
        assert code == 0, out
        manifest = json.loads((bundle / "slmops.json").read_text())
        assert manifest["base"]["architecture"] == arch.name
        assert f"| architecture | {arch.name} |" in (bundle / "README.md").read_text()
        texts = {}
        for adapter in ("small", "large"):
            code, out = run(
                "generate",
                bundle,
                "-a",
                adapter,
                "-p",
                "Tell me about the sea",
                "--max-new-tokens",
                "8",
                "--temperature",
                "1",
                "--seed",
                "1",
                "--json",
            )
            assert code == 0, out
            texts[adapter] = json.loads(out)["text"]
        code, out = run("verify", bundle, "--parity", "--json")
        rows = json.loads(out)["parity"]["rows"]
        print(name, precision, [(r["name"], r["max_abs_diff"], r["kl_mean"], r["agreement"]) for r in rows])  # -rP
        assert [r["name"] for r in rows] == ["base", "small", "large"]
        if precision == "fp32":
            assert code == 0, out
            assert all(r["max_abs_diff"] <= 1e-3 for r in rows), rows
        else:  # a random model's logits are near ties, so int4 may flip its top-1; the distributions stay close
            assert all(r["kl_mean"] <= 0.01 for r in rows), rows

    code, out = run("bench", tmp_path / "int4", "--scenario", "16:8", "--reps", "1", "--json")
    assert code == 0, out
    adapters = {r["adapter"] for r in json.loads(out)["rows"] if r["engine"] == "onnxruntime-genai"}
    assert {"base", "small", "large"} <= adapters


def tiny_recipe(tmp: Path, model: Path, modules: str) -> Path:
    return write_recipe(
        tmp / "recipe.yaml",
        f"""name: refused
model: {{name: {model}}}
data: {{file: {SFT_DATA}, format: alpaca}}
lora: {{target_modules: [{modules}]}}
""",
    )


def test_an_architecture_export_cannot_take_is_refused_before_training(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(model)
    code, out = run("finetune", "--recipe", tiny_recipe(tmp_path, model, "c_attn"), "-o", tmp_path / "out")
    assert code == 2
    assert out.splitlines()[-1] == (
        "Error: model architecture GPT2LMHeadModel (gpt2) is not one slmops can export with adapters; "
        "supported: llama, mistral, qwen2, qwen3, phi3, gemma2"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arch", "modules", "named"),
    [("phi3", "q_proj, o_proj", "q_proj"), ("llama", "q_proj, qkv_proj, lm_head", "qkv_proj, lm_head")],
)
def test_a_module_export_cannot_take_is_refused_before_training(arch, modules, named, tmp_path):
    model = family_model(FAMILIES[arch], tmp_path / "model")
    code, out = run("finetune", "--recipe", tiny_recipe(tmp_path, model, modules), "-o", tmp_path / "out")
    assert code == 2
    choices = ", ".join(ARCH_OF[arch].modules)
    assert out.splitlines()[-1] == (
        f"Error: lora.target_modules {named} is not a linear module of {arch} that export takes; choose from {choices}"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_packed_phi3_adapters_mix_with_unpacked_and_join_a_bundle_later(tmp_path):
    from slmops.shipping.batching import read_onnx_adapter

    model = family_model(FAMILIES["phi3"], tmp_path / "model")
    packed = make_adapter(model, tmp_path / "packed", 4, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], seed=1)
    plain = make_adapter(model, tmp_path / "plain", 2, ["o_proj", "down_proj"], seed=2)
    qkv = make_adapter(model, tmp_path / "qkv", 8, ["qkv_proj"], seed=3)
    bundle = tmp_path / "bundle"
    code, out = run("export", "-m", model, "-a", f"packed={packed}", "-a", f"plain={plain}", "-p", "fp32", "-o", bundle)
    assert code == 0, out
    # FuseLoRA's layout: one LoRA pair per packed group, the trained A as it is ([hidden, r]), B over q|k|v
    tensors = read_onnx_adapter(bundle / "adapters" / "packed.onnx_adapter")
    assert tensors["model.layers.0.attn.qkv_proj.lora_A.MatMul.weight"].shape == (128, 4)
    assert tensors["model.layers.0.attn.qkv_proj.lora_B.MatMul.weight"].shape == (4, 128 + 64 + 64)
    assert tensors["model.layers.0.mlp.gate_up_proj.lora_B.MatMul.weight"].shape == (4, 2 * 256)

    code, out = run("export", "--into", bundle, "-m", model, "-a", f"qkv={qkv}")
    assert code == 0, out
    code, out = run("verify", bundle, "--parity", "--json")
    assert code == 0, out
    rows = json.loads(out)["parity"]["rows"]
    assert [r["name"] for r in rows] == ["base", "packed", "plain", "qkv"]
    assert all(r["max_abs_diff"] <= 1e-3 for r in rows), rows

    from slmops.shipping.runtime import Runtime, Sampling

    rt = Runtime(bundle)
    prompt = rt.chat_prompt([{"role": "user", "content": "Tell me about the sea"}])
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=3)
    outputs = {name: tuple(rt.generate(prompt, name, sampling).tokens) for name in (None, "packed", "plain", "qkv")}
    assert len(set(outputs.values())) == 4  # each adapter switches in
    assert tuple(rt.generate(prompt, None, sampling).tokens) == outputs[None]


def test_a_packed_adapter_needs_its_inputs_in_the_graph(tmp_path):

    model = family_model(FAMILIES["phi3"], tmp_path / "model")
    plain = make_adapter(model, tmp_path / "plain", 2, ["o_proj"], seed=2)
    qkv = make_adapter(model, tmp_path / "qkv", 4, ["qkv_proj"], seed=3)
    code, out = run("export", "-m", model, "-a", f"plain={plain}", "-p", "fp32", "-o", tmp_path / "bundle")
    assert code == 0, out
    code, out = run("export", "--into", tmp_path / "bundle", "-m", model, "-a", f"qkv={qkv}")
    assert code == 2
    assert out.splitlines()[-1] == (
        "Error: adapter 'qkv' trains qkv_proj in layer 0, which the bundle's graph has no LoRA input for; export "
        "again with this adapter (or --lora-modules covering it) so the base graph includes it"
    )


def test_a_template_longer_than_the_dpo_budget_is_one_error(tmp_path):
    from transformers import AutoTokenizer

    from slmops.core.errors import DataError
    from slmops.training.data import fit_prompt

    tokenizer = AutoTokenizer.from_pretrained(family_model(FAMILIES["llama"], tmp_path / "model"))
    pair = {"prompt": [{"role": "user", "content": "a question"}], "chosen": "yes", "rejected": "no"}
    assert fit_prompt(pair, tokenizer, 512)["prompt"] == pair["prompt"]
    with pytest.raises(DataError, match=r"^max_length 32 leaves 28 tokens for a prompt, fewer than .*; raise dpo"):
        fit_prompt(pair, tokenizer, 32)  # Llama 3.2's template writes a dated system header first


def test_an_adapter_on_unpacked_projections_is_refused_by_a_packed_base(tmp_path):
    phi3 = family_model(FAMILIES["phi3"], tmp_path / "phi3")
    same_sizes = {k: FAMILIES["phi3"].config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
    llama = build_tiny_model(tmp_path / "llama", corpus_texts(), num_key_value_heads=1, **same_sizes)
    adapter = make_adapter(llama, tmp_path / "q", 2, ["q_proj"], seed=1)
    code, out = run("export", "-m", phi3, "-a", f"q={adapter}", "-p", "fp32", "-o", tmp_path / "bundle")
    assert code == 2
    assert out.splitlines()[-1] == (
        f"Error: adapter 'q' trains q_proj, which base '{phi3}' packs into qkv_proj; it was trained on another "
        "model layout"
    )
