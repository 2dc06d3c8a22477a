#!/usr/bin/env python
"""Quantization choices for the export: top-1 agreement with PyTorch fp32 next to decode speed.

Exports the model (with one adapter) once per variant through `slmops export`, then measures
  - teacher-forced top-1 agreement with PyTorch fp32 on held-out text, for the base and the adapter
    (slmops.parity, the same check as `slmops verify --parity`);
  - decode tokens/s on onnxruntime-genai (128-token prompt, 128 new tokens, greedy, 2 threads),
    against PyTorch fp32 `generate` on the same prompt.

    python scripts/bench_quant.py --adapter dpo=outputs/demo/dpo-hh [--variants int4:rtn,int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ["int4:default", "int4:rtn", "int4:k_quant", "int4:k_quant_last", "int4:k_quant_mixed", "int8", "fp32"]
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. " * 8).strip()


def export(model: str, adapter: str, variant: str, out: Path) -> float:
    precision, _, algo = variant.partition(":")
    cmd = ["slmops", "export", "-m", model, "-a", adapter, "-p", precision, "-o", str(out), "--json"]
    if algo:
        cmd += ["--int4-algo", algo]
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def prompt_ids(tokenizer, n: int = 128) -> list[int]:
    return tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:n]


def ort_decode_rate(bundle: Path, ids: list[int], adapter: str | None, new: int = 128, threads: int = 2) -> float:
    import onnxruntime_genai as og

    from slmops.runtime import Runtime

    rt = Runtime(bundle, threads=threads)
    if adapter:
        rt.load_adapter(adapter)
    rates = []
    for _ in range(3):
        params = og.GeneratorParams(rt.model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(rt.model, params)
        if adapter:
            gen.set_active_adapter(rt.adapters, adapter)
        gen.append_tokens(ids)
        gen.generate_next_token()
        start, count = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return sorted(rates)[1]


def torch_decode_rate(model_path: Path, ids: list[int], new: int = 128, threads: int = 2) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    inp = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        model.generate(inp, max_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(inp, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(inp, max_new_tokens=new, min_new_tokens=new, **kwargs)
        total = time.perf_counter() - start
    return (new - 1) / (total - prefill)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True, help="NAME=PATH of one adapter (PEFT or finetune output folder)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="Also write the rows here.")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from slmops.bundle import read_manifest
    from slmops.models import resolve_model
    from slmops.parity import adapter_sources, check_parity
    from slmops.privacy import go_offline

    go_offline()
    model = resolve_model(args.model)
    name = args.adapter.partition("=")[0]
    ids = prompt_ids(AutoTokenizer.from_pretrained(model.path))
    torch_rate = torch_decode_rate(model.path, ids)
    print(f"PyTorch fp32 decode: {torch_rate:.1f} tok/s ({len(ids)}-token prompt, 128 new, 2 threads)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            bundle = Path(tmp) / variant.replace(":", "-")
            seconds = export(args.model, args.adapter, variant, bundle)
            manifest = read_manifest(bundle)
            report = check_parity(bundle, manifest, model.path, adapter_sources(manifest, {}))
            base_rate = ort_decode_rate(bundle, ids, None)
            rows.append({
                "variant": variant, "export_s": round(seconds, 1),
                "model_mb": round((bundle / "model.onnx").stat().st_size / 2**20
                                  + sum(p.stat().st_size for p in bundle.glob("*.onnx.data")) / 2**20, 1),
                "agree_base": round(report.rows[0].agreement, 4), "agree_adapter": round(report.rows[1].agreement, 4),
                "decode_base": round(base_rate, 1), "decode_adapter": round(ort_decode_rate(bundle, ids, name), 1),
                "x_torch": round(base_rate / torch_rate, 2),
            })
            r = rows[-1]
            print(f"{variant:<20} agree base {r['agree_base']:.1%} adapter {r['agree_adapter']:.1%}  decode "
                  f"{r['decode_base']:.0f} / {r['decode_adapter']:.0f} tok/s ({r['x_torch']:.1f}x torch)  "
                  f"{r['model_mb']} MB  export {r['export_s']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch_fp32_decode": round(torch_rate, 1), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
