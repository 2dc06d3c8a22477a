"""Compare export variants of one base (KV cache, int4 method, ...) against llama.cpp, interleaved in one process.

`slmops bench` measures one bundle with its adapters; this measures the base of several bundles side by side,
so that a lever (--kv-cache int8, --int4-algo rtn, a session option) is judged in one run, as ratios:

    python scripts/bench_levers.py fp32-kv=B1 int8-kv=B2 --scenario 128:128 --scenario 4096:128 --reps 5

Prints a markdown table: decode and prefill tok/s per variant and scenario (median of the reps), and each
as a ratio to llama.cpp on the GGUF embedded for the bundles' base (or --gguf). A variant NAME=BUNDLE@KEY=VALUE
overlays a decoder session option, e.g. arena-off=B1@enable_cpu_mem_arena=false.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from slmops.cli.bench import parse_scenario
from slmops.core.models import embedded_gguf
from slmops.measuring.bench import Scenario, prompt_ids
from slmops.measuring.runners import interleaved
from slmops.shipping.manifest import read_manifest


def variant_bundle(spec: str, scratch: Path) -> tuple[str, str]:
    """NAME=BUNDLE[@KEY=VALUE]: the bundle, or a copy of its config with the session option set (weights linked)."""
    name, _, rest = spec.partition("=")
    bundle, _, option = rest.partition("@")
    if not option:
        return name, bundle
    key, _, value = option.partition("=")
    copy = scratch / name
    copy.mkdir()
    for item in Path(bundle).iterdir():
        (copy / item.name).symlink_to(item.resolve())
    config = json.loads((Path(bundle) / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"][key] = json.loads(value)
    (copy / "genai_config.json").unlink()
    (copy / "genai_config.json").write_text(json.dumps(config, indent=2))
    return name, str(copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=BUNDLE[@KEY=VALUE]")
    parser.add_argument("--scenario", action="append", default=[], metavar="PROMPT:NEW")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", default=None, help="llama.cpp baseline (default: the base's embedded GGUF)")
    args = parser.parse_args()
    scenarios: list[Scenario] = [parse_scenario(s) for s in args.scenario or ["128:128", "1024:128", "4096:128"]]
    scratch = Path(tempfile.mkdtemp(prefix="slmops-levers-"))
    try:
        bundles = dict(variant_bundle(spec, scratch) for spec in args.variants)
        first = Path(next(iter(bundles.values())))
        gguf = args.gguf or str(embedded_gguf(read_manifest(first).base.name))
        feeds = [
            {"name": s.name, "ids": prompt_ids(first, s.prompt_tokens), "new_tokens": s.new_tokens} for s in scenarios
        ]
        engines = {
            "onnxruntime-genai": {"bundles": bundles, "adapters": {name: ["base"] for name in bundles}},
            "llama.cpp": {"gguf": gguf},
        }
        samples = interleaved(engines, feeds, reps=args.reps, warmup=args.warmup, threads=args.threads)["samples"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(samples, scenarios, [*bundles, Path(gguf).name]))


def table(samples: list[dict], scenarios: list[Scenario], variants: list[str]) -> str:
    def median(scenario, variant, key):
        values = [s[key] for s in samples if s["scenario"] == scenario and s["variant"] == variant and s[key]]
        return statistics.median(values) if values else None

    lines = [
        "| scenario | variant | decode tok/s | x llama.cpp | prefill tok/s | x llama.cpp |",
        "|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        llama = {k: median(s.name, variants[-1], k) for k in ("decode_tps", "prefill_tps")}
        for v in variants:
            d, p = median(s.name, v, "decode_tps"), median(s.name, v, "prefill_tps")
            lines.append(
                f"| {s.name} | {v} | {d:.1f} | {d / llama['decode_tps']:.2f}x | {p:.0f} | "
                f"{p / llama['prefill_tps']:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
