"""Data-parallel fine-tuning: one Olive workflow in N processes under `accelerate launch`.

Every rank runs the same Olive workflow; the trainer inside each pass (Olive's LoRA / QLoRA,
slmops' DPO) finds the process group accelerate set up and trains one model with the others
(DDP; FSDP and DeepSpeed when an accelerate config file says so). On CPU the group uses gloo.

Only rank 0 writes outputs and logs. The checkpoint folders are shared, where the trainer saves
on rank 0 only, so every rank resumes from the same checkpoint. Olive's cache and output
of the other ranks go to scratch folders under the work folder, deleted afterwards, and their
terminal output to a log file there (shown only when a rank fails).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from slmops.core.errors import RunError
from slmops.training.recipe import DistributedSection

SCRATCH = "ranks"  # under the work folder: rank-N/{olive-cache,olive-output,log.txt}


def launch_command(config_path: Path, dist: DistributedSection, port: int) -> list[str]:
    """`accelerate launch` running this module's worker in dist.num_processes processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if dist.config_file:
        cmd += ["--config_file", str(Path(dist.config_file).expanduser().resolve())]
    else:
        cmd += ["--multi_gpu"]  # torchrun-style DDP; the worker picks gloo where there is no GPU
    cmd += [
        "--num_processes",
        str(dist.num_processes),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "slmops.training.distributed",
        str(config_path),
    ]
    return cmd


def run(config: dict, work: Path, dist: DistributedSection) -> None:
    """Run the Olive workflow `config` in dist.num_processes processes; return when all have finished."""
    if dist.config_file and not Path(dist.config_file).expanduser().is_file():
        raise RunError(
            f"distributed.config_file {dist.config_file} not found; give the path of an accelerate "
            "config file (write one with `accelerate config`)"
        )
    config_path = work / "olive_config.distributed.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2))
    port = dist.main_process_port or _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Own process group: an interrupt reaches the launcher once, from us, and it stops its workers.
    process = subprocess.Popen(
        launch_command(config_path, dist, port), env=env, start_new_session=True, stdout=sys.stderr, stderr=sys.stderr
    )
    try:
        code = process.wait()
    except BaseException:  # Ctrl-C / SIGTERM in the parent
        _stop(process)
        raise
    if code != 0:
        raise RunError(
            f"distributed training failed (accelerate launch exited {code}){_failed_rank(work)}; "
            "rerun with --verbose, or with distributed.num_processes: 1 to see the error alone"
        )


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failed_rank(work: Path) -> str:
    """The last line of the first rank log that has an error in it."""
    for log in sorted((work / SCRATCH).glob("rank-*/log.txt")):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        if errors:
            return f": {log.parent.name}: {errors[-1][:300]}"
    return ""


def rank_config(config: dict, rank: int) -> dict:
    """Rank 0 keeps the workflow's cache and output; other ranks get scratch ones (checkpoints stay shared)."""
    if rank == 0:
        return config
    scratch = Path(config["cache_dir"]).parent / SCRATCH / f"rank-{rank}"
    return dict(config, cache_dir=str(scratch / "olive-cache"), output_dir=str(scratch / "olive-output"))


def _worker(config_path: Path) -> int:
    rank = int(os.environ.get("RANK", "0"))
    config = rank_config(json.loads(config_path.read_text()), rank)
    if rank:
        _quiet(Path(config["cache_dir"]).parent / "log.txt")

    from slmops.core.privacy import go_offline

    go_offline(allow_hub=os.environ.get("HF_HUB_OFFLINE") != "1")  # as the parent decided; telemetry off
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the trainers then join a gloo group instead of training alone

    import slmops.training.olive_data  # noqa: F401 - registers slmops' data components with Olive
    from slmops.core.errors import SlmopsError
    from slmops.core.workflows import run_workflow

    try:  # seeds LoRA's init from the recipe: the same initial adapter as a one-process run
        run_workflow(config, Path(config["cache_dir"]).parent / f"cwd-{rank}", f"rank {rank}'s fine-tune failed")
    except SlmopsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


def _quiet(log: Path) -> None:
    """Send this process's stdout and stderr (Python's and native code's) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sys.exit(_worker(Path(args[0])))


if __name__ == "__main__":
    main()
