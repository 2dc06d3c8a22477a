#!/usr/bin/env python
"""SFT with and without `training.packing`, interleaved: trained tokens/s and the held-out loss.

    SLMOPS_DATA_DIR=../shared/data python scripts/bench_packing.py [--recipe smollm2-135m-sft-h4rmony]
        [--samples 120] [--reps 1]

Each run trains one epoch over the same examples, so both see the same trained tokens (packing
changes which examples share a step, not what is trained); tokens/s is those tokens over the wall
time of the trainer's train() (timed here; Olive runs it in this process), its evaluation taken out. Prints JSON: per mode, seconds, tokens/s, steps, final and held-out
loss, and the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2-135m-sft-h4rmony")
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    from slmops.training.finetune import finetune
    from slmops.training.recipe import load_recipe, prepare_environment

    sets = [
        f"data.max_samples={args.samples}",
        "training.max_steps=-1",
        "training.epochs=1",
        "training.logging_steps=1",
    ]
    runs: dict[str, list] = {"unpacked": [], "packed": []}
    seconds: dict[str, list] = {"unpacked": [], "packed": []}
    trained = _trained_tokens(load_recipe(args.recipe, sets=sets))
    timer = _TrainTimer()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for mode in ("unpacked", "packed"):  # interleaved: the machine's drift hits both
                recipe = load_recipe(args.recipe, sets=[*sets, f"training.packing={mode == 'packed'}"])
                prepare_environment(recipe)
                result = finetune(recipe, Path(tmp) / f"{mode}-{rep}")
                evals = sum(e.get("eval_runtime", 0.0) for e in result.log)
                seconds[mode].append(timer.last - evals)
                runs[mode].append(result.stages["sft"])
    out = {"recipe": args.recipe, "examples": args.samples, "trained_tokens": trained}
    for mode, stages in runs.items():
        out[mode] = {
            "train_seconds": round(statistics.median(seconds[mode]), 1),
            "trained_tokens_per_s": round(trained / statistics.median(seconds[mode]), 1),
            "steps": stages[0].steps,
            "final_loss": stages[-1].final_loss,
            "eval_loss": stages[-1].eval_loss,
        }
    out["speedup"] = round(out["packed"]["trained_tokens_per_s"] / out["unpacked"]["trained_tokens_per_s"], 2)
    print(json.dumps(out, indent=2))


class _TrainTimer:
    """Wall time of each Trainer.train() call (Olive runs the trainer in this process), evaluation
    included; the script takes the trainer's own eval_runtime back out."""

    def __init__(self) -> None:
        import time

        import transformers

        self.last = 0.0
        train = transformers.Trainer.train

        def timed(trainer, *args, **kwargs):
            start = time.perf_counter()
            try:
                return train(trainer, *args, **kwargs)
            finally:
                self.last = time.perf_counter() - start

        transformers.Trainer.train = timed


def _trained_tokens(recipe) -> int:
    """Trained tokens in one epoch of the recipe's training examples (the same packed or not)."""
    from transformers import AutoTokenizer

    from slmops.core.models import resolve_model
    from slmops.training.preview import preview

    AutoTokenizer.from_pretrained(resolve_model(recipe.model.name).path)  # fails early without the model
    stats = preview(recipe, rows=0).stats[0]
    return round(stats.tokens * stats.trained_share)


if __name__ == "__main__":
    main()
