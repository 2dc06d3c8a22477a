"""llama.cpp, the baseline `slmops bench` measures against, run for real on the embedded SmolLM2 GGUF."""

import pytest

from slmops.core.models import DEFAULT_MODEL, embedded_gguf, resolve_model
from slmops.measuring.runners import LlamaCppRunner, TorchRunner, interleaved

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(DEFAULT_MODEL).path))
    # no system turn: with SmolLM2's default one the first token is a near-tie (logits 25.33 vs 25.24)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llamacpp_answers_as_pytorch_does_on_the_same_token_ids(prompt):
    """The GGUF holds Q4_1 blocks and the HF model their exact dequantization, so greedy decoding from the same
    token ids must agree: the engine is fed the ids, not text it would tokenize its own way."""
    gguf = str(embedded_gguf(DEFAULT_MODEL))
    llama = LlamaCppRunner(gguf, [{"ids": prompt, "new_tokens": 7}], threads=2)
    timed = llama.run(llama.jobs()[0][0], "base", prompt, 7)  # "The capital of France is Paris.", then <|im_end|>
    reference = TorchRunner(str(resolve_model(DEFAULT_MODEL).path), {}, threads=2).run("fp32", "base", prompt, 7)
    assert timed["tokens"] == reference["tokens"] and len(set(timed["tokens"])) == 7
    assert 0 < timed["ttft_ms"] < timed["e2e_ms"] and timed["decode_tps"] > 1 and timed["prefill_tps"] > 1


def test_interleaved_run_times_every_repetition(prompt):
    gguf = str(embedded_gguf(DEFAULT_MODEL))
    scenarios = [
        {"name": "short", "ids": prompt[:8], "new_tokens": 4},
        {"name": "long", "ids": prompt, "new_tokens": 4},
    ]
    result = interleaved({"llama.cpp": {"gguf": gguf}}, scenarios, reps=2, warmup=1, threads=2)
    assert [(s["scenario"], s["engine"]) for s in result["samples"]] == [("short", "llama.cpp")] * 2 + [
        ("long", "llama.cpp")
    ] * 2
