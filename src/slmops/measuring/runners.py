"""Timed generation on each engine `slmops bench` compares, all fed the same token ids, greedy, N new tokens.

onnxruntime-genai (the bundle), PyTorch (+PEFT: what users run instead), llama.cpp (what they run on
the edge), and the machine's memory read bandwidth. `slmops bench` times all engines interleaved in
one child process, and measures each engine's peak RSS alone in another:
    python -m slmops.measuring.runners '{"engine": "interleaved", "engines": {"llama.cpp": {"gguf": ...}}, "scenarios": [...]}'
prints one JSON object on stdout.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def sample(prompt_tokens: int, new_tokens: int, prefill_s: float, first_s: float, total_s: float) -> dict:
    """One timed generation: prefill_s to process the prompt, first_s to the first new token, total_s to the end."""
    return {
        "ttft_ms": first_s * 1000,
        "prefill_tps": prompt_tokens / prefill_s if prefill_s > 0 else None,
        "decode_tps": (new_tokens - 1) / (total_s - first_s) if total_s > first_s else None,
        "e2e_ms": total_s * 1000,
    }


class OrtRunner:
    """Bundles on onnxruntime-genai, every adapter loaded once (its load time recorded)."""

    engine = "onnxruntime-genai"

    def __init__(self, bundles: dict, adapters: dict, threads: int, **_):
        from slmops.shipping.runtime import Runtime

        self.runtimes = {variant: Runtime(path, threads=threads) for variant, path in bundles.items()}
        self.adapters, self.loads = adapters, {}
        for variant, names in adapters.items():
            for name in names:
                if name != "base":
                    start = time.perf_counter()
                    self.runtimes[variant].load_adapter(name)
                    self.loads[name] = (time.perf_counter() - start) * 1000

    def jobs(self):
        return jobs(self.engine, {"adapters": self.adapters})

    def run(self, variant: str, adapter: str, ids: list[int], new_tokens: int) -> dict:
        import onnxruntime_genai as og

        runtime = self.runtimes[variant]
        params = og.GeneratorParams(runtime.model)
        total_length = len(ids) + new_tokens
        params.set_search_options(max_length=total_length, min_length=total_length, do_sample=False)
        generator = og.Generator(runtime.model, params)
        if adapter != "base":
            generator.set_active_adapter(runtime.adapters, adapter)
        start = time.perf_counter()
        generator.append_tokens(ids)
        prefill = time.perf_counter() - start
        generator.generate_next_token()
        first = time.perf_counter() - start
        while not generator.is_done():
            generator.generate_next_token()
        total = time.perf_counter() - start
        tokens = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        return dict(sample(len(ids), len(tokens), prefill, first, total), tokens=tokens)

    def extra(self) -> dict:
        first = next(iter(self.adapters))
        names = [n for n in self.adapters[first] if n != "base"]
        return {"adapter_load_ms": self.loads, "adapter_switch_ms": _switch_ms(self.runtimes[first], names)}


def _switch_ms(runtime, adapters: list[str], rounds: int = 20):
    """Median time to make an adapter active on a new generator (adapters already loaded)."""
    import onnxruntime_genai as og

    if not adapters:
        return None
    times = []
    for i in range(rounds):
        params = og.GeneratorParams(runtime.model)
        params.set_search_options(max_length=8)
        generator = og.Generator(runtime.model, params)
        start = time.perf_counter()
        generator.set_active_adapter(runtime.adapters, adapters[i % len(adapters)])
        times.append((time.perf_counter() - start) * 1000)
        del generator
    return statistics.median(times)


class TorchRunner:
    """transformers fp32 `generate` (greedy, exactly N new tokens); adapters through PEFT, unmerged."""

    engine = "pytorch"

    def __init__(self, model: str, adapters: dict, threads: int, **_):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.base = self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.names = list(adapters)
        if adapters:
            from slmops.core.models import with_adapters

            self.model = with_adapters(self.base, adapters)
        self.warm: set[tuple[str, int]] = set()

    def jobs(self):
        return jobs(self.engine, {"adapters": self.names})

    def run(self, variant: str, adapter: str, ids: list[int], new_tokens: int) -> dict:
        import torch

        if adapter != "base":
            self.model.set_adapter(adapter)
        plain = adapter == "base" and self.names
        kwargs = dict(do_sample=False, pad_token_id=self.base.config.eos_token_id)
        with self.model.disable_adapter() if plain else contextlib.nullcontext(), torch.no_grad():
            prompt = torch.tensor([ids])
            if (adapter, len(ids)) not in self.warm:  # the first call of a shape pays for allocations
                self.model.generate(input_ids=prompt, max_new_tokens=2, **kwargs)
                self.warm.add((adapter, len(ids)))
            start = time.perf_counter()
            self.model(
                input_ids=prompt, logits_to_keep=1
            )  # prefill: the prompt, last position's logits (as ORT, llama.cpp)
            prefill = time.perf_counter() - start
            clock = _FirstToken()
            start = clock.start = time.perf_counter()
            out = self.model.generate(
                input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **kwargs
            )
            total = time.perf_counter() - start
        assert clock.first is not None  # scenarios generate at least 2 new tokens (parse_scenario)
        return dict(sample(len(ids), new_tokens, prefill, clock.first, total), tokens=out[0, len(ids) :].tolist())


class _FirstToken:
    """A `generate` streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.start, self.first, self._puts = 0.0, None, 0

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class LlamaCppRunner:
    """llama-cpp-python on a GGUF of the same base, fed the same token ids; greedy."""

    engine = "llama.cpp"

    def __init__(self, gguf: str, scenarios: list, threads: int, **_):
        from llama_cpp import Llama

        context = max(len(s["ids"]) + s["new_tokens"] for s in scenarios) + 8
        self.name = gguf
        self.llm = Llama(
            model_path=gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )

    def jobs(self):
        return jobs(self.engine, {"gguf": self.name})

    def run(self, variant: str, adapter: str, ids: list[int], new_tokens: int) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - start
        first, tokens = None, []
        for count in range(1, new_tokens + 1):
            tokens.append(int(self.llm.sample(temp=0.0)))
            first = first if first is not None else time.perf_counter() - start
            if count < new_tokens:
                self.llm.eval([tokens[-1]])
        assert first is not None  # scenarios generate at least 2 new tokens (parse_scenario)
        return dict(sample(len(ids), new_tokens, prefill, first, time.perf_counter() - start), tokens=tokens)


RUNNERS = {runner.engine: runner for runner in (OrtRunner, TorchRunner, LlamaCppRunner)}


def jobs(engine: str, args: dict) -> list[tuple[str, str]]:
    """The (variant, adapter) pairs an engine runs, from its runner's arguments."""
    if engine == "onnxruntime-genai":
        return [(variant, name) for variant, names in args["adapters"].items() for name in names]
    if engine == "pytorch":
        return [("fp32", name) for name in ["base", *args["adapters"]]]
    return [(Path(args["gguf"]).name, "base")]


def interleaved(
    engines: dict, scenarios: list, reps: int, warmup: int, threads: int, pytorch_reps: int = 1, **_
) -> dict:
    """Every engine loaded in this one process, then per scenario and repetition one run of each (engine,
    variant, adapter) in turn, so slow drifts of a shared machine hit all of them alike. PyTorch, far
    slower, runs in the first `pytorch_reps` repetitions only.

    engines: engine name -> that runner's arguments (bundles/adapters, model/adapters, gguf)."""
    runners = [RUNNERS[name](**args, scenarios=scenarios, threads=threads) for name, args in engines.items()]
    out = []
    for scenario in scenarios:
        for rep in range(warmup + reps):
            for runner in runners:
                if runner.engine == "pytorch" and rep >= warmup + pytorch_reps:
                    continue
                for variant, adapter in runner.jobs():
                    timed = runner.run(variant, adapter, scenario["ids"], scenario["new_tokens"])
                    if rep >= warmup:
                        out.append(
                            dict(
                                timed, engine=runner.engine, variant=variant, adapter=adapter, scenario=scenario["name"]
                            )
                        )
    result = {"samples": out}
    for runner in runners:
        result.update(runner.extra() if hasattr(runner, "extra") else {})
    return result


def bandwidth(threads: int, size_mb: int = 512, rounds: int = 10, **_) -> dict:
    """Memory read bandwidth in GB/s: the best of several multi-threaded sums over a buffer far larger than cache."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _round in range(rounds):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return {"gbs": data.numel() * 4 / best / 1e9}


def peak_rss_mb() -> float:
    """This process's peak RSS since it started: VmHWM, which, unlike ru_maxrss, does not count the parent's
    memory that a forked child held before it exec'd."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ENGINES: dict[str, Callable[..., dict]] = {"interleaved": interleaved, "bandwidth": bandwidth}


if __name__ == "__main__":
    from slmops.core.privacy import go_offline

    go_offline(olive=False)
    args = json.loads(sys.argv[1])
    print(json.dumps(dict(ENGINES[args["engine"]](**args), peak_rss_mb=peak_rss_mb())))
