"""Timed generation on each engine `slmops bench` compares, all fed the same token ids, greedy, N new tokens.

onnxruntime-genai (the bundle), PyTorch (+PEFT: what users run instead), llama.cpp (what they run on
the edge), and the machine's memory read bandwidth. `slmops bench` runs each in a child process,
so that each peak RSS is that engine's own:
    python -m slmops.engines '{"engine": "pytorch", "model": ..., "adapters": {...}, "scenarios": [...]}'
prints one JSON object on stdout.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time


def sample(prompt_tokens: int, new_tokens: int, prefill_s: float, first_s: float, total_s: float) -> dict:
    """One timed generation: prefill_s to process the prompt, first_s to the first new token, total_s to the end."""
    return {
        "ttft_ms": first_s * 1000,
        "prefill_tps": prompt_tokens / prefill_s if prefill_s > 0 else None,
        "decode_tps": (new_tokens - 1) / (total_s - first_s) if total_s > first_s else None,
        "e2e_ms": total_s * 1000,
    }


def onnxruntime_genai(bundles: dict, adapters: dict, scenarios: list, reps: int, warmup: int, threads: int,
                      **_) -> dict:
    """Bundles on onnxruntime-genai, every adapter loaded (load time each), then per scenario and repetition
    one run of every (bundle, adapter) in turn, so slow drifts of a shared machine hit all of them alike."""
    from slmops.runtime import Runtime

    runtimes = {variant: Runtime(path, threads=threads) for variant, path in bundles.items()}
    loads = {}
    for variant, names in adapters.items():
        for name in names:
            if name != "base":
                start = time.perf_counter()
                runtimes[variant].load_adapter(name)
                loads[name] = (time.perf_counter() - start) * 1000
    out = []
    for scenario in scenarios:
        for rep in range(warmup + reps):
            for variant, names in adapters.items():
                for name in names:
                    timed = _ort_generate(runtimes[variant], scenario["ids"], scenario["new_tokens"], name)
                    if rep >= warmup:
                        out.append(dict(timed, variant=variant, adapter=name, scenario=scenario["name"]))
    first = next(iter(adapters))
    return {"samples": out, "adapter_load_ms": loads,
            "adapter_switch_ms": _switch_ms(runtimes[first], [n for n in adapters[first] if n != "base"])}


def _ort_generate(runtime, ids: list[int], new_tokens: int, adapter: str) -> dict:
    import onnxruntime_genai as og

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
    count = 1
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    return sample(len(ids), count, prefill, first, time.perf_counter() - start)


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


def pytorch(model: str, adapters: dict, scenarios: list, reps: int, threads: int, **_) -> dict:
    """transformers fp32 `generate` (greedy, exactly N new tokens); adapters through PEFT, unmerged."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    engine = base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        engine = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            engine.load_adapter(adapters[name], adapter_name=name)
    kwargs = dict(do_sample=False, pad_token_id=base.config.eos_token_id)
    out = []
    for adapter in [None, *adapters]:
        if adapter is not None:
            engine.set_adapter(adapter)
        context = engine.disable_adapter() if adapter is None and adapters else contextlib.nullcontext()
        with context, torch.no_grad():
            for scenario in scenarios:
                ids, new = torch.tensor([scenario["ids"]]), scenario["new_tokens"]
                engine.generate(input_ids=ids, max_new_tokens=2, **kwargs)  # warm-up
                for _ in range(reps):
                    start = time.perf_counter()
                    engine(input_ids=ids)  # prefill: one forward pass over the prompt
                    prefill = time.perf_counter() - start
                    start = time.perf_counter()
                    engine.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    engine.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
                    total = time.perf_counter() - start
                    out.append(dict(sample(ids.shape[1], new, prefill, first, total),
                                    adapter=adapter or "base", scenario=scenario["name"]))
    return {"samples": out}


def llamacpp(gguf: str, scenarios: list, reps: int, warmup: int, threads: int, **_) -> dict:
    """llama-cpp-python on a GGUF of the same base, fed the same token ids; greedy."""
    from llama_cpp import Llama

    context = max(len(s["ids"]) + s["new_tokens"] for s in scenarios) + 8
    llm = Llama(model_path=gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    out = []
    for scenario in scenarios:
        ids, new = scenario["ids"], scenario["new_tokens"]
        for rep in range(warmup + reps):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prefill = time.perf_counter() - start
            first = None
            for count in range(1, new + 1):
                token = llm.sample(temp=0.0)
                first = first if first is not None else time.perf_counter() - start
                if count < new:
                    llm.eval([token])
            total = time.perf_counter() - start
            if rep >= warmup:
                out.append(dict(sample(len(ids), new, prefill, first, total), adapter="base",
                                scenario=scenario["name"]))
    return {"samples": out}


def bandwidth(threads: int, size_mb: int = 512, rounds: int = 10, **_) -> dict:
    """Memory read bandwidth in GB/s: the best of several multi-threaded sums over a buffer far larger than cache."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(rounds):
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


ENGINES = {"onnxruntime-genai": onnxruntime_genai, "pytorch": pytorch, "llama.cpp": llamacpp,
           "bandwidth": bandwidth}


if __name__ == "__main__":
    from slmops.privacy import go_offline

    go_offline(olive=False)
    args = json.loads(sys.argv[1])
    print(json.dumps(dict(ENGINES[args["engine"]](**args), peak_rss_mb=peak_rss_mb())))
