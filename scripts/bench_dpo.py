#!/usr/bin/env python
"""DPO training throughput: `slmops finetune` against a plain TRL DPOTrainer script.

Both train the same model (SmolLM2-135M-Instruct by default) with the same LoRA (r=16 on
q/k/v/o), batch size, max length and steps on the hh-rlhf pairs. slmops runs twice, as shipped
and with `dpo.share_prompt` off, so the table shows what prefix sharing adds. Each run is its own
process, and `--rounds N` interleaves the variants N times. The report gives trained tokens/s
and s/step (TRL's own train_runtime and token count: prompt + answer for both sides of a pair,
whether or not the prompt was computed once), the final train loss, wall time, peak RSS, and
the median ratios to plain TRL.

    SLMOPS_DATA_DIR=../shared/data python scripts/bench_dpo.py --steps 16 --rounds 2
    python scripts/bench_dpo.py --steps 16 --baseline-bf16     # also give the baseline bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[str, float, float]:
    """Run a command; return its stdout, wall seconds and peak RSS in MiB (from wait4)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return out, time.monotonic() - start, usage.ru_maxrss / 1024


def run_slmops(args, work: Path, share_prompt: bool = True) -> dict:
    out_dir = work / "out"
    cmd = [
        sys.executable,
        "-m",
        "slmops.cli",
        "finetune",
        "--recipe",
        str(REPO / "recipes" / "smollm2-135m-dpo-hh.yaml"),
        "-o",
        str(out_dir),
        "--json",
        "--set",
        f"dpo.max_steps={args.steps}",
        "--set",
        f"dpo.batch_size={args.batch_size}",
        "--set",
        f"dpo.max_length={args.max_length}",
        "--set",
        "dpo.data.eval_split=null",
        "--set",
        f"dpo.share_prompt={str(share_prompt).lower()}",
    ]
    stdout, wall, rss = timed(cmd)
    stage = json.loads(stdout)["stages"]["dpo"]
    return {
        "variant": "slmops finetune" + ("" if share_prompt else " (share_prompt off)"),
        "steps": stage["steps"],
        "train_seconds": stage["train_seconds"],
        "tokens": stage["tokens"],
        "final_loss": stage["final_loss"],
        "wall_seconds": wall,
        "peak_rss_mib": rss,
    }


def run_plain(args, work: Path, model_path: Path, data: Path) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "dpo_plain_trl.py"),
        "--model",
        str(model_path),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--output-dir",
        str(work),
    ]
    if args.baseline_bf16:
        cmd.append("--bf16")
    stdout, wall, rss = timed(cmd)
    result = json.loads(stdout.strip().splitlines()[-1])
    label = "plain TRL DPOTrainer" + (" (bf16 autocast)" if args.baseline_bf16 else " (fp32)")
    return {
        "variant": label,
        "steps": result["steps"],
        "train_seconds": result["train_runtime"],
        "tokens": result["num_tokens"],
        "final_loss": result["final_loss"],
        "wall_seconds": wall,
        "peak_rss_mib": rss,
    }


def table(rows: list[dict]) -> str:
    head = f"{'variant':<36} {'steps':>5} {'s/step':>7} {'tokens/s':>9} {'final loss':>10} {'wall s':>7} {'peak RSS MiB':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<36} {r['steps']:>5} {r['train_seconds'] / r['steps']:>7.2f} "
            f"{r['tokens'] / r['train_seconds']:>9.1f} {r['final_loss']:>10.4f} {r['wall_seconds']:>7.1f} "
            f"{r['peak_rss_mib']:>12.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--baseline-bf16", action="store_true", help="give the plain TRL script bf16 autocast too")
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from slmops.core.models import resolve_model
    from slmops.core.privacy import go_offline
    from slmops.training.data import locate

    go_offline()
    model_path = resolve_model("smollm2-135m-instruct").path
    data = Path(locate("hh_rlhf_harmless_1k.jsonl", None).path)
    variants = {
        "slmops": lambda tmp: run_slmops(args, tmp),
        "slmops-unshared": lambda tmp: run_slmops(args, tmp, share_prompt=False),
        "plain": lambda tmp: run_plain(args, tmp, model_path, data),
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        for round_ in range(args.rounds):  # interleaved, so drift hits every variant alike
            for name, run in variants.items():
                rows.append(run(Path(tmp) / f"{name}-{round_}") | {"key": name, "round": round_})
                print(json.dumps(rows[-1]), flush=True)
    speed = {
        name: statistics.median(r["tokens"] / r["train_seconds"] for r in rows if r["key"] == name) for name in variants
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, {args.rounds} round(s)"
    )
    print(table(rows))
    print(
        f"median trained tokens/s, slmops / plain TRL: {speed['slmops'] / speed['plain']:.2f}x; "
        f"with share_prompt off: {speed['slmops-unshared'] / speed['plain']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
