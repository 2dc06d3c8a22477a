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
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from slmops.core.errors import RunError
from slmops.training import checkin
from slmops.training.recipe import DistributedSection

SCRATCH = "ranks"  # under the work folder: rank-N/{olive-cache,olive-output,log.txt}


@dataclass(frozen=True)
class Topology:
    """Where this machine stands: the recipe's distributed keys over the accelerate config file's own values."""

    processes: int  # in all, over every machine
    machines: int
    rank: int  # this machine's
    host: str  # machine 0
    port: int  # slmops' check-in with several machines; the launcher's rendezvous is port + 1
    given: frozenset[str]  # the settings to pass on the command line (the rest come from the config file)

    @property
    def launcher_port(self) -> int:
        return self.port + 1 if self.machines > 1 else self.port


def topology(dist: DistributedSection) -> Topology:
    """Merge the recipe/flags with the accelerate config file: a key the recipe or a flag sets wins, else the file's."""
    file = _config_file(dist)
    given = set(dist.model_fields_set) & {"num_processes", "num_machines", "machine_rank", "main_address"}

    def pick(key: str) -> int:
        return int(getattr(dist, key) if key in given or key not in file else file[key])

    processes, machines, rank = pick("num_processes"), pick("num_machines"), pick("machine_rank")
    if dist.main_address:
        host, _, port_text = dist.main_address.rpartition(":")
        port = int(port_text)
    else:
        host = str(file.get("main_process_ip") or "127.0.0.1")
        port = int(file.get("main_process_port") or dist.main_process_port or (0 if machines == 1 else 29500))
        port = port or _free_port()
    if not 0 <= rank < machines:
        raise RunError(f"distributed.machine_rank {rank} is outside 0..{machines - 1} (num_machines {machines})")
    if machines > 1 and not dist.main_address and not file.get("main_process_ip"):
        raise RunError(
            f"{machines} machines need machine 0's address: add --main-address HOST:PORT (the same on every machine)"
        )
    if processes % machines:
        raise RunError(
            f"distributed.num_processes {processes} (in all) does not divide over {machines} machines; "
            "give each machine the same number"
        )
    return Topology(processes, machines, rank, host, port, frozenset(given))


def _config_file(dist: DistributedSection) -> dict:
    if not dist.config_file:
        return {}
    path = Path(dist.config_file).expanduser()
    if not path.is_file():
        raise RunError(
            f"distributed.config_file {dist.config_file} not found; give the path of an accelerate "
            "config file (write one with `accelerate config`)"
        )
    import yaml

    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise RunError(f"distributed.config_file {dist.config_file} is not an accelerate config (a YAML mapping)")
    return loaded


def check_strategy(dist: DistributedSection) -> None:
    """FSDP and DeepSpeed run on GPUs here; on CPU they are refused before anything starts, with the reason."""
    import torch

    if torch.cuda.is_available() or dist.strategy == "ddp":
        return
    why = {
        "fsdp": "accelerate's FSDP plugin needs a GPU to sync module states ('no available devices found'), and "
        "with that off it did not reproduce a one-process run on CPU (3.3e-3 apart in the loss after 3 steps)",
        "deepspeed": "DeepSpeed's CPU accelerator needs Intel's extension and oneCCL, which slmops does not set up",
    }[dist.strategy]
    raise RunError(f"distributed.strategy {dist.strategy} is refused on CPU: {why}; use strategy ddp (gloo) here")


def launch_command(config_path: Path, dist: DistributedSection, topo: Topology) -> list[str]:
    """This machine's launcher (accelerate launch, or torchrun) running this module's worker."""
    worker = ["-m", "slmops.training.distributed", str(config_path)]
    if dist.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={topo.machines}",
            f"--node-rank={topo.rank}",
            f"--nproc-per-node={topo.processes // topo.machines}",
            f"--master-addr={topo.host}",
            f"--master-port={topo.launcher_port}",
            *worker,
        ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if dist.config_file:
        cmd += ["--config_file", str(Path(dist.config_file).expanduser().resolve())]
        given = topo.given  # the file's own values hold for the rest
    else:
        cmd += ["--multi_gpu"]  # torchrun-style DDP; the worker picks gloo where there is no GPU
        given = frozenset({"num_processes", "num_machines", "machine_rank", "main_address"})
    if "num_processes" in given:
        cmd += ["--num_processes", str(topo.processes)]
    if "num_machines" in given:
        cmd += ["--num_machines", str(topo.machines)]
    if "machine_rank" in given:
        cmd += ["--machine_rank", str(topo.rank)]
    # always: with several machines slmops' check-in holds the main port, so the launcher's is the next one
    cmd += ["--main_process_ip", topo.host, "--main_process_port", str(topo.launcher_port)]
    if not dist.config_file:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + worker


def run(config: dict, work: Path, dist: DistributedSection, topo: Topology, identity: Optional[dict] = None) -> None:
    """Run the Olive workflow `config` in this machine's share of the processes; return when all have finished.

    With several machines, this machine first checks in with machine 0 (`identity`: what it is about to
    train), then keeps checking in while it trains; a failure or silence anywhere stops every machine."""
    config_path = work / "olive_config.distributed.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2))
    if topo.machines == 1:
        _train_here(launch_command(config_path, dist, topo), work, None)
        return
    server = checkin.Server(topo.port, topo.machines, dist.timeout) if topo.rank == 0 else None
    client = checkin.Client(topo.host, topo.port, topo.rank, dist.timeout)
    try:
        _keep_checkpoints_up_to(work, client.join(identity or {}))
        _train_here(launch_command(config_path, dist, topo), work, client)
        client.finish()
    except RunError:
        client.check("leave")  # the others know why (they told us, or _train_here reported it)
        raise
    except BaseException:  # Ctrl-C / SIGTERM here: stop the others now, not after a timeout
        client.check("fail", "interrupted (Ctrl-C or SIGTERM)")
        raise
    finally:
        if server is not None:
            server.wait_finished()  # the others still ask machine 0 how the run ended
            server.close()


def _keep_checkpoints_up_to(work: Path, resume: Optional[list[str]]) -> None:
    """Drop the checkpoints newer than the one every machine has, so that all resume from the same step."""
    if resume is None:
        return
    common = checkin.checkpoint_order(resume[0], int(resume[1]))
    for folder in work.glob("*checkpoints/checkpoint-*"):
        if checkin.checkpoint_order(folder.parent.name, int(folder.name.split("-")[1])) > common:
            shutil.rmtree(folder)


def _train_here(cmd: list[str], work: Path, client: Optional[checkin.Client]) -> None:
    shutil.rmtree(work / SCRATCH, ignore_errors=True)  # a previous attempt's error lines are not this one's
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Own process group: an interrupt reaches the launcher once, from us, and it stops its workers.
    process = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stderr, stderr=sys.stderr)
    try:
        code = _wait(process, client)
    except BaseException:  # Ctrl-C / SIGTERM in the parent, or another machine's failure
        _stop(process)
        raise
    if code == 0:
        return
    failed = _failed_rank(work)
    if client is None:
        raise RunError(
            f"distributed training failed (the launcher exited {code}){': ' + failed if failed else ''}; "
            "rerun with --verbose, or with distributed.num_processes: 1 to see the error alone"
        )
    reason = failed or f"its training processes exited {code}"
    if _PEER_LOST.search(reason):  # a peer went away: let machine 0 say which (bounded by the timeout)
        deadline = time.monotonic() + client.timeout
        while time.monotonic() < deadline:
            stop = client.check()
            if stop:
                raise RunError(stop)
            time.sleep(0.5)
    stop = client.check("fail", reason)
    raise RunError(stop or f"machine {client.rank} failed: {reason}")


_PEER_LOST = re.compile(r"gloo|NCCL|Connection (closed|reset) by peer|Broken pipe", re.IGNORECASE)


def _wait(process: subprocess.Popen, client: Optional[checkin.Client]) -> int:
    """The launcher's exit code; with several machines, checking in meanwhile (RunError if another stopped)."""
    if client is None:
        return process.wait()
    while True:
        try:
            return process.wait(timeout=checkin.BEAT_SECONDS)
        except subprocess.TimeoutExpired:
            stop = client.check()
            if stop:
                raise RunError(stop) from None  # run() tells machine 0 this one has left


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
    """The error line a rank of this machine left (error.txt), else the last error line of a quiet rank's log."""
    own = [(e.parent.name, e.read_text().strip()[:300]) for e in sorted((work / SCRATCH).glob("rank-*/error.txt"))]
    for rank, line in sorted(own, key=lambda e: bool(_PEER_LOST.search(e[1]))):  # a rank's own error first
        return f"{rank}: {line}"
    for log in sorted((work / SCRATCH).glob("rank-*/log.txt")):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        if errors:
            return f"{log.parent.name}: {errors[-1][:300]}"
    return ""


def rank_config(config: dict, rank: int) -> dict:
    """Rank 0 keeps the workflow's cache and output; other ranks get scratch ones (checkpoints stay shared)."""
    if rank == 0:
        return config
    scratch = Path(config["cache_dir"]).parent / SCRATCH / f"rank-{rank}"
    return dict(config, cache_dir=str(scratch / "olive-cache"), output_dir=str(scratch / "olive-output"))


def _worker(config_path: Path) -> int:
    rank = int(os.environ.get("RANK", "0"))
    shared = json.loads(config_path.read_text())
    error = Path(shared["cache_dir"]).parent / SCRATCH / f"rank-{rank}" / "error.txt"  # read by _failed_rank
    config = rank_config(shared, rank)
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
        error.parent.mkdir(parents=True, exist_ok=True)
        error.write_text(str(exc) + "\n")  # what the machine's `slmops finetune` reports
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
