"""Where fine-tunes and sweeps put their output, and how later commands find it again.

outputs/<recipe>-<timestamp>/            a fine-tune (export and bench take the newest without --adapter)
outputs/<recipe>-sweep-<timestamp>/      a sweep (sweep.json; `export -a NAME=SWEEP` takes its best trial)
outputs/matrix-<name>-<timestamp>/       `bench --matrix`: a bundle per cell and the comparison table
outputs/.slmops-partial-<name>/          one still running, or interrupted (--resume continues the newest)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from slmops.core.errors import RunError
from slmops.core.files import PARTIAL_PREFIX

OUTPUTS = Path("outputs")
SWEEP = "sweep.json"  # a sweep's record, in its folder


def default_output(recipe_name: str) -> Path:
    """Where a run goes without -o: outputs/<recipe>-<sortable timestamp>."""
    return OUTPUTS / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_sweep_output(recipe_name: str) -> Path:
    return OUTPUTS / f"{recipe_name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def default_matrix_output(name: str) -> Path:
    """Where `bench --matrix` writes its bundles and table without -o."""
    return OUTPUTS / f"matrix-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(recipe_name: str) -> Path:
    """The newest finetune output of a recipe in its default place (what export/bench use without --adapter)."""
    runs = sorted(p.parent for p in OUTPUTS.glob(f"{recipe_name}-*/adapter/adapter_config.json"))
    if not runs:
        raise RunError(
            f"no adapter given and no finetune output of recipe {recipe_name} under outputs/; "
            f"run `slmops finetune --recipe {recipe_name}` first, or pass --adapter NAME=PATH"
        )
    return runs[-1]  # names end in a sortable timestamp


def interrupted_run(recipe_name: str) -> Path:
    """The output folder of the recipe's newest interrupted run under outputs/ (what --resume without -o continues)."""
    partials = sorted(
        p
        for p in OUTPUTS.glob(f"{PARTIAL_PREFIX}{recipe_name}-*")
        if (p / "recipe.yaml").is_file() and not (p / SWEEP).is_file()
    )  # a sweep of the recipe: `slmops sweep --resume`
    if not partials:
        raise RunError(
            f"nothing to resume: no interrupted run of recipe {recipe_name} under outputs/; "
            "run without --resume, or pass -o with the interrupted run's output folder"
        )
    return partials[-1].parent / partials[-1].name[len(PARTIAL_PREFIX) :]


def interrupted_sweep(recipe_name: str) -> Path:
    """The output folder of the recipe's newest interrupted sweep under outputs/ (--resume without -o)."""
    partials = sorted(p for p in OUTPUTS.glob(f"{PARTIAL_PREFIX}{recipe_name}-sweep-*") if (p / SWEEP).is_file())
    if not partials:
        raise RunError(
            f"nothing to resume: no interrupted sweep of recipe {recipe_name} under outputs/; run without "
            "--resume, or pass -o with the interrupted sweep's folder"
        )
    return partials[-1].parent / partials[-1].name[len(PARTIAL_PREFIX) :]


def best_trial_folder(sweep_dir: Path) -> Path:
    """The fine-tune output of a sweep's best trial (what `export -a NAME=SWEEP` takes)."""
    body = json.loads((Path(sweep_dir) / SWEEP).read_text())
    if not body.get("best"):
        raise RunError(f"sweep {sweep_dir} has no finished trial to take; finish it with `slmops sweep --resume`")
    return Path(sweep_dir) / body["best"]["folder"]


def last_checkpoint(partial: Path) -> Optional[tuple[Path, int]]:
    """The checkpoint an interrupted fine-tune resumes from, and its step: the newest complete one
    of the stage that saved last (SFT's before DPO's in a two-stage run)."""
    found = complete_checkpoints(partial / "work")
    if not found:
        return None
    return max(found, key=lambda c: ((c[0] / "trainer_state.json").stat().st_mtime, c[1]))


def complete_checkpoints(work: Path) -> list[tuple[Path, int]]:
    """Every checkpoint of a fine-tune's work folder that a save finished, with its step."""
    found = []
    for state in work.glob("*/checkpoint-*/trainer_state.json"):
        try:
            found.append((state.parent, int(json.loads(state.read_text())["global_step"])))
        except (OSError, ValueError, KeyError):
            continue  # a save the kill cut short: the run resumes from the one before
    return found


def has_checkpoint(partial: Path) -> bool:
    """Whether an interrupted fine-tune saved a checkpoint to resume from."""
    # work/checkpoints (SFT), work/dpo-checkpoints; the trainer writes trainer_state.json last
    return any(partial.glob("work/*/checkpoint-*/trainer_state.json"))
