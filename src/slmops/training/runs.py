"""The local runs index: one record per fine-tune, sweep and sweep trial, under ./runs ($SLMOPS_RUNS_DIR).

    runs/<id>/record.json   recipe, model, data hashes, metrics, durations, output paths, status
    runs/<id>/loss.png      train and eval loss per stage (fine-tunes and trials)

A record is written when the run starts (status "running") and again when it ends (done, failed or
interrupted), each time whole through a temporary file and a rename. A crash therefore leaves
every other record intact and its own one saying "running". The run holds a lock on
runs/<id>/.alive while it lives, which the kernel drops when the process dies however it dies, so
`slmops runs list` shows such a run as crashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Iterator

from slmops.core.errors import RunError
from slmops.core.files import write_file, write_text

RECORD = "record.json"
PLOT = "loss.png"
ALIVE = ".alive"  # flock-ed by the run's process for as long as it runs


def runs_dir() -> Path:
    return Path(os.environ.get("SLMOPS_RUNS_DIR") or "runs")


def write_record(record: dict) -> None:
    # fsync: a power cut leaves the old record or the new one, never an empty file
    write_text(runs_dir() / record["id"] / RECORD, json.dumps(record, indent=2) + "\n", fsync=True)


@contextlib.contextmanager
def track(kind: str, name: str, output: Path, **fields) -> Iterator[dict]:
    """Record a run in the index while the block runs; the block may add fields (metrics, ...) to the record."""
    started = time.time()
    record = {
        "id": f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{name}-{secrets.token_hex(3)}",
        "kind": kind,
        "name": name,
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _stamp(started),
        "ended": None,
        "seconds": None,
        "output": str(Path(output).absolute()),
        **fields,
    }
    folder = runs_dir() / record["id"]
    folder.mkdir(parents=True, exist_ok=True)
    alive = os.open(folder / ALIVE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(alive, fcntl.LOCK_EX)  # held while the run lives; the kernel drops it when the process dies
    write_record(record)
    try:
        yield record
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        raise
    except BaseException as exc:
        record.update(status="failed", error=(str(exc).strip().splitlines() or [type(exc).__name__])[0])
        raise
    else:
        record["status"] = "done"
    finally:
        record.update(ended=_stamp(time.time()), seconds=round(time.time() - started, 1))
        write_record(record)
        os.close(alive)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def finetune_fields(recipe) -> dict:
    return {"recipe": recipe.name, "method": recipe.method, "stages": recipe.stages, "model": recipe.model.name}


def add_finetune_result(record: dict, result) -> None:
    """Metrics, data hashes and outputs of a finished fine-tune, and its loss plot."""
    run = json.loads((Path(result.output_dir) / "run.json").read_text())
    out = Path(record["output"])  # the final place (a sweep's trial is written inside the sweep's partial folder)
    record.update(
        data={
            stage: {"path": s.get("path") or s.get("dataset"), "sha256": s.get("sha256")}
            for stage, s in run.get("data", {}).items()
        },
        model_sha256=run.get("model", {}).get("sha256"),
        train_seconds=result.seconds,
        metrics={
            stage: {
                "steps": s.steps,
                "first_loss": s.first_loss,
                "final_loss": s.final_loss,
                "eval_loss": s.eval_loss,
                **{f"eval_{k}": v for k, v in s.eval_metrics.items() if k != "loss"},
            }
            for stage, s in result.stages.items()
        },
        outputs={
            "adapter": str(out / "adapter"),
            "olive_config": str(out / "olive_config.json"),
            "training_log": str(out / "training_log.jsonl"),
        },
    )
    if result.log:
        plot = runs_dir().absolute() / record["id"] / PLOT
        plot_losses({"": result.log}, plot, title=f"{record['name']} ({record['id']})")
        record["outputs"]["loss_plot"] = str(plot)


def plot_losses(logs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Train loss per step (lines) and eval loss (points) of each labelled log, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(e.get("stage", "train") for log in logs.values() for e in log))
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for n, (label, log) in enumerate(logs.items()):
            entries = [e for e in log if e.get("stage", "train") == stage]
            train = [(e.get("step", i), e["loss"]) for i, e in enumerate(entries) if "loss" in e]
            evals = [(e.get("step", i), e["eval_loss"]) for i, e in enumerate(entries) if "eval_loss" in e]
            color = f"C{n % 10}"
            if train:
                ax.plot(*zip(*train), color=color, label=f"{label} train".strip())
            if evals:
                ax.plot(*zip(*evals), "o--", color=color, label=f"{label} eval".strip())
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def list_runs() -> list[dict]:
    """Every readable record, oldest first; a 'running' one whose process is gone is shown as crashed."""
    records = []
    for path in sorted(runs_dir().glob(f"*/{RECORD}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a record this version wrote whole; the others still list
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("id", "kind", "status")):
            continue
        if record["status"] == "running" and not _alive(path.parent):
            record["status"] = "crashed"
        records.append(record)
    return sorted(records, key=lambda r: (str(r.get("started") or ""), r["id"]))


def _alive(folder: Path) -> bool:
    """Whether the run's process still holds its lock (pids can be reused; the lock dies with the process)."""
    try:
        fd = os.open(folder / ALIVE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def find_run(prefix: str) -> dict:
    runs = list_runs()
    exact = [r for r in runs if r["id"] == prefix]
    matches = exact or [r for r in runs if r["id"].startswith(prefix) or r["id"].endswith(prefix)]
    if not matches:
        raise RunError(f"no run '{prefix}' in {runs_dir()}; `slmops runs list` shows the ids")
    if len(matches) > 1:
        raise RunError(
            f"'{prefix}' matches {len(matches)} runs ({', '.join(r['id'] for r in matches[:3])}, ...); "
            "give more of the id"
        )
    return matches[0]
