"""Run a bundle on onnxruntime-genai: the model, its tokenizer and chat template, adapters switched per request.

Shared by `slmops generate`, `chat`, `serve` and `bench`. Each generation gets its own generator
holding its own active adapter, so requests for different adapters never mix.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from slmops.core.choices import PROVIDERS, available_targets
from slmops.shipping.manifest import BundleError, BundleManifest, read_manifest
from slmops.shipping.package import is_package


@dataclass(frozen=True)
class Sampling:
    """Decoding options. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50
    seed: Optional[int] = None

    def check(self) -> None:
        problems = [
            (self.max_new_tokens < 1, "max new tokens must be at least 1"),
            (self.temperature < 0, "temperature must be >= 0 (0 is greedy)"),
            (not 0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (self.top_k < 1, "top-k must be at least 1"),
        ]
        for bad, why in problems:
            if bad:
                raise BundleError(f"bad sampling option: {why}")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    seconds: float
    first_token_seconds: Optional[float] = None
    tokens: list[int] = field(default_factory=list)


class Runtime:
    """A loaded bundle. Thread-safe: one generator per call, adapters loaded once."""

    def __init__(
        self, bundle: Path, threads: Optional[int] = None, merged: Optional[str] = None, variant: Optional[str] = None
    ):
        from slmops.core.privacy import go_offline

        go_offline(olive=False)  # before onnxruntime-genai loads: its telemetry reads the environment
        import onnxruntime_genai as og

        self.path = self.source = Path(bundle)  # path: the bundle, or a package variant's flat view
        self.variant: Optional[str] = None
        if is_package(self.path):
            self.path = self._open_package(self.path, variant, merged)
        elif variant is not None:
            raise BundleError(f"--variant is for model packages; '{bundle}' is a single bundle")
        self.manifest = read_manifest(self.path)
        self._og = og
        model_dir = self.path
        if merged is not None:  # a merged variant: its own model, no adapters to switch
            variants = self.manifest.merged
            if merged not in variants:
                raise BundleError(
                    f"unknown merged variant '{merged}'; this bundle has: "
                    f"{', '.join(variants) or 'none (export with --merge NAME)'}"
                )
            model_dir = self.path / variants[merged].folder
            self.manifest = self.manifest.model_copy(update={"adapters": {}})
        self.model_dir = model_dir  # the decoder's folder: the bundle's, or a merged variant's
        config = og.Config(str(model_dir))
        _select_provider(og, config, self.manifest)
        if threads:
            config.overlay(
                json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}})
            )
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self.context_length = context_length(model_dir)
        ids = self.tokenizer.eos_token_ids
        self.eos = {int(i) for i in (ids if hasattr(ids, "__iter__") else [ids])}

    def _open_package(self, pkg: Path, variant: Optional[str], merged: Optional[str]) -> Path:
        """A variant of a model package, laid out as a flat bundle in a folder that lives as long as we do."""
        import tempfile

        from slmops.shipping.manifest import read_package_manifest
        from slmops.shipping.package import choose_variant, open_variant

        if merged is not None:
            raise BundleError("a model package has no merged models; run --merged on the bundle that has them")
        self.variant = choose_variant(read_package_manifest(pkg), variant, available_targets())
        self._view = tempfile.TemporaryDirectory(prefix="slmops-variant-")
        return open_variant(pkg, self.variant, Path(self._view.name))

    @property
    def adapter_names(self) -> list[str]:
        return list(self.manifest.adapters)

    def load_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                return
            if name not in self.manifest.adapters:
                known = ", ".join(self.adapter_names) or "none"
                raise BundleError(f"unknown adapter '{name}'; this bundle has: {known}")
            path = self.manifest.adapter_file(self.path, name)  # from the manifest, never from the name
            if not path.is_file():
                raise BundleError(f"adapter file {path} is missing; run `slmops verify {self.source}`")
            self.adapters.load(str(path), name)
            self._loaded.add(name)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's own chat template applied to the messages, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def stream(
        self,
        prompt: str,
        adapter: Optional[str] = None,
        sampling: Sampling = Sampling(),
        stop: tuple[str, ...] = (),
        result: Optional[Completion] = None,
    ) -> Iterator[str]:
        """Yield the completion of a raw prompt piece by piece; `result` (if given) is filled in at the end."""
        og = self._og
        sampling.check()
        tokens = self.encode(prompt)
        budget = self.context_length - len(tokens)
        if budget < 1:
            raise BundleError(
                f"prompt is {len(tokens)} tokens, the model's context is {self.context_length}; shorten the prompt"
            )
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = dict(
            max_length=len(tokens) + min(sampling.max_new_tokens, budget), do_sample=sampling.temperature > 0
        )
        if sampling.temperature > 0:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        if adapter:
            self.load_adapter(adapter)
            generator.set_active_adapter(self.adapters, adapter)
        text = TextStream(self, stop)
        start, first = time.perf_counter(), None
        generator.append_tokens(tokens)
        while not generator.is_done():
            generator.generate_next_token()
            first = first if first is not None else time.perf_counter() - start
            piece = text.add(generator.get_next_tokens()[0])
            if piece:
                yield piece
            if text.finish:
                break
        finish = text.finish or "length"
        if finish == "length" and len(tokens) + len(text.tokens) < options["max_length"]:
            finish = "stop"  # the generator ended on its own: an end-of-sequence token
        del generator
        if result is not None:
            result.text, result.prompt_tokens, result.completion_tokens = text.text, len(tokens), len(text.tokens)
            result.finish_reason, result.seconds = finish, time.perf_counter() - start
            result.first_token_seconds, result.tokens = first, text.tokens

    def generate(
        self, prompt: str, adapter: Optional[str] = None, sampling: Sampling = Sampling(), stop: tuple[str, ...] = ()
    ) -> Completion:
        result = Completion("", 0, 0, "length", 0.0)
        for _ in self.stream(prompt, adapter, sampling, stop, result):
            pass
        return result


class TextStream:
    """Token ids in, text out, for one completion: it ends at an end-of-sequence token or a stop string."""

    def __init__(self, runtime: Runtime, stop: tuple[str, ...] = ()):
        self.decoder = runtime.tokenizer.create_stream()
        self.eos, self.stop = runtime.eos, stop
        self.text = ""
        self.tokens: list[int] = []
        self.finish: Optional[str] = None  # "stop" once ended

    def add(self, token: int) -> str:
        """The new text `token` brings (cut at a stop string); sets `finish` when the completion ends."""
        token = int(token)
        if token in self.eos:
            self.finish = "stop"
            return ""
        self.tokens.append(token)
        piece = self.decoder.decode(token)
        self.text += piece
        hit = _first_stop(self.text, self.stop)
        if hit is not None:
            piece = piece[: max(0, len(piece) - (len(self.text) - hit))]
            self.text = self.text[:hit]
            self.finish = "stop"
        return piece


def _first_stop(text: str, stop: tuple[str, ...]) -> Optional[int]:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def context_length(path: Path) -> int:
    config = json.loads((path / "genai_config.json").read_text())
    return int(config["model"].get("context_length") or config.get("search", {}).get("max_length") or 2048)


def _select_provider(og, config, manifest: BundleManifest) -> None:
    """Run on the provider the bundle was built for; refuse one this machine does not have (no fallback)."""
    target = manifest.target.name
    if target == "cpu":
        return
    if target not in available_targets():
        raise BundleError(
            f"bundle is built for {manifest.target.execution_provider}, which this machine's "
            f"ONNX Runtime does not have (it has: {', '.join(available_targets())}); run it on a machine "
            "with that device, or export for --target cpu"
        )
    config.clear_providers()
    config.append_provider(PROVIDERS[target][1])
