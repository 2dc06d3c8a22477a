"""Experiment trackers (`training.report_to` / `--report-to`): opt-in, never on by default.

The trainers inside Olive's LoRA pass and slmops' DPO pass log to them through transformers'
callbacks. Olive runs in a scratch folder that is deleted after the run, so the places the trackers
would write by default are pinned to lasting ones unless the user's environment already sets them:
TensorBoard event files are moved into the run's `tensorboard/<stage>/`, MLflow writes to ./mlruns
and wandb keeps its files in the current folder (wandb may sync online: that is wandb's own setting).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from slmops.core.errors import RunError

# tracker -> modules any one of which transformers' callback can use
_NEEDS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_trackers(report_to: Sequence[str]) -> None:
    for tracker in report_to:
        if not any(importlib.util.find_spec(module) for module in _NEEDS[tracker]):
            raise RunError(
                f"reporting to {tracker} needs the {_NEEDS[tracker][0]} package, which is not installed; "
                f"`pip install {_NEEDS[tracker][0]}`, or drop {tracker} from --report-to / "
                "training.report_to"
            )


@contextlib.contextmanager
def tracker_environment(report_to: Sequence[str], run_name: str) -> Iterator[None]:
    """Set where MLflow and wandb write (unless already set) for the length of a run."""
    here = Path.cwd().absolute()
    wanted: dict[str, str] = {}
    if "mlflow" in report_to:
        wanted.update(MLFLOW_TRACKING_URI=(here / "mlruns").as_uri(), MLFLOW_EXPERIMENT_NAME=run_name)
    if "wandb" in report_to:
        wanted.update(WANDB_DIR=str(here), WANDB_PROJECT=run_name)
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def keep_tensorboard_logs(checkpoints: Path, into: Path) -> None:
    """Move a stage's TensorBoard event files (the trainer writes them under <output_dir>/runs/) into `into`."""
    logs = checkpoints / "runs"
    if logs.is_dir():
        into.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(logs), str(into))
