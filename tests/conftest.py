"""Shared fixtures: a tiny random Llama with a tokenizer trained in-process on tests/fixtures/corpus.txt,
the tests' own small data files (tests/fixtures), and the real data (only for tests about the real data)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from slmops.core.privacy import go_offline

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # original, small; written by fixtures/make_fixtures.py
CORPUS = FIXTURES / "corpus.txt"  # the tiny tokenizer's training text
SFT_DATA = FIXTURES / "sft.jsonl"  # alpaca rows: instruction, input (often empty), output
PREFERENCE_DATA = FIXTURES / "prefs.jsonl"  # explicit preference rows: prompt, chosen, rejected
SHARED_DATA = Path(os.environ.get("SLMOPS_DATA_DIR") or REPO.parent / "shared" / "data")

# Tests never touch the network: same switches as every slmops command.
go_offline(allow_hub=False)
os.environ["SLMOPS_DATA_DIR"] = str(SHARED_DATA)  # tests that need another value use monkeypatch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def runs_index(tmp_path_factory, monkeypatch) -> Path:
    """Each test's runs index in its own folder, never ./runs of the checkout."""
    folder = tmp_path_factory.mktemp("runs")
    monkeypatch.setenv("SLMOPS_RUNS_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data files, for the tests whose point is the real data (unit tests use FIXTURES)."""
    if not (SHARED_DATA / "h4rmony_alpaca.jsonl").is_file():
        pytest.fail(f"real data not found in {SHARED_DATA}; set SLMOPS_DATA_DIR to the shared data folder")
    return SHARED_DATA


@dataclass(frozen=True)
class Chat:
    """A tokenizer's chat set-up: its template, the special tokens it writes, and which is which."""

    template: str
    specials: tuple[str, ...]
    bos: Optional[str]  # None: the family has no begin-of-text token (Qwen, Phi-3)
    eos: str  # the end-of-turn token: generation stops there
    pad: str


CHATML = Chat(
    CHAT_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", "<|endoftext|>"
)


def build_tiny_model(
    folder: Path, texts: list[str], seed: int = 0, arch: str = "llama", chat: Chat = CHATML, **config_overrides
) -> Path:
    """A 2-layer model (hidden 64, the least bitsandbytes 4-bit takes on CPU) of a real architecture
    (ARCHS), and a 400-token byte-level BPE trained on `texts` with `chat`'s special tokens and template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(chat.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=chat.bos, eos_token=chat.eos, pad_token=chat.pad
    )
    tokenizer.chat_template = chat.template
    torch.manual_seed(seed)
    config_class, model_class = (getattr(transformers, f"{ARCHS[arch]}{kind}") for kind in ("Config", "ForCausalLM"))
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=arch != "phi3",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "phi3":  # one context length, the 4k layout (a longer one makes the builder expect LongRoPE factors)
        settings["original_max_position_embeddings"] = 512
    config = config_class(**{**settings, **config_overrides})
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# model_type -> transformers class prefix
ARCHS = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "gemma2": "Gemma2",
}


def corpus_texts() -> list[str]:
    return CORPUS.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus_texts())


@pytest.fixture
def no_network(monkeypatch):
    """Record every outbound connection attempt (and refuse it); loopback and unix sockets are allowed."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError("network disabled in tests")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: guarded(self, address) or 0)
    return attempts


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path
