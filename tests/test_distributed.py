"""Data-parallel fine-tuning under accelerate: 2 CPU processes (gloo) against 1 with the same global batch."""

import json
from pathlib import Path

import pytest

from conftest import PREFERENCE_DATA, SFT_DATA, write_recipe
from slmops.core.errors import RecipeError, RunError
from slmops.training.finetune import finetune
from slmops.training.recipe import DistributedSection, load_recipe

# Same examples per step, the same initial adapter and (SFT) the same number of trained tokens in every
# example: the curves differ only by the order of floating-point sums across processes. Measured: <= 2e-4
# (SFT), 0 (DPO). With unequal token counts per rank, 2 processes average per-rank mean losses, which is not
# the token mean one process takes (measured 4.4e-3 apart on the fixture rows at max_seq_len 64).
LOSS_TOLERANCE = 1e-3
SFT_SEQ_LEN = 26  # every fixture answer is cut to 13 tokens: the equal-token-count premise above


def _recipe(tmp_path: Path, model: Path, body: str, name: str):
    head = f"model:\n  name: {model}\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n"
    return load_recipe(str(write_recipe(tmp_path / f"{name}.yaml", head + body)))


SFT = f"""
data:
  file: {SFT_DATA}
  max_samples: 32
  max_seq_len: {SFT_SEQ_LEN}
training:
  max_steps: 6
  batch_size: {{batch}}
  learning_rate: 1.0e-2
  dtype: float32
"""

DPO = f"""
dpo:
  data:
    file: {PREFERENCE_DATA}
    max_samples: 32
  max_length: 64
  max_steps: 4
  batch_size: {{batch}}
  learning_rate: 1.0e-2
  dtype: float32
"""


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in e]


def _trained_tokens(recipe, model: Path) -> list[int]:
    from transformers import AutoTokenizer

    from slmops.training import data

    train, _ = data.load_splits(data.locate(recipe.data.file, None), "sft", max_samples=recipe.data.max_samples)
    features = data.tokenize_sft(train, AutoTokenizer.from_pretrained(model), recipe.data.max_seq_len)
    return [sum(label != data.IGNORE_INDEX for label in f["labels"]) for f in features]


def _adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # accelerate launches 2 processes, then 1 more run
@pytest.mark.parametrize("stage, body", [("sft", SFT), ("dpo", DPO)])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model, stage, body):
    one = _recipe(tmp_path, tiny_model, body.format(batch=4), "one")
    if stage == "sft":
        assert len(set(_trained_tokens(one, tiny_model))) == 1, "the premise: equal trained tokens per example"
    two = _recipe(tmp_path, tiny_model, body.format(batch=2), "two")
    two.distributed.num_processes = 2
    finetune(one, tmp_path / "one")
    result = finetune(two, tmp_path / "two")

    single, parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(parallel) == result.stages[stage].steps  # each step logged once, by rank 0
    assert max(abs(a - b) for a, b in zip(single, parallel)) <= LOSS_TOLERANCE, (single, parallel)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    # Adam moves each weight up to lr (1e-2) per step, however small its gradient, so summation-order
    # noise in near-zero gradients shows in single weights: less than one step apart after all steps.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2
    # One adapter, written once, in the output; the other rank's scratch folder is gone.
    out = tmp_path / "two"
    assert [p.relative_to(out) for p in out.rglob("adapter_model.safetensors")] == [
        Path("adapter/adapter_model.safetensors")
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "olive_config.json",
        "recipe.yaml",
        "run.json",
        "training_log.jsonl",
    ]
    assert not list(tmp_path.glob(".slmops-*"))


@pytest.mark.slow  # accelerate launches 2 processes
def test_a_failing_rank_is_one_error(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text(SFT_DATA.read_text())
    recipe = _recipe(tmp_path, tiny_model, SFT.format(batch=2).replace(str(SFT_DATA), str(data)), "bad")
    recipe.distributed.num_processes = 2
    import slmops.training.finetune as finetune_mod

    real = finetune_mod.validate  # the last check before training starts (Olive validates the config)

    def validate_then_edit(config):  # the data changes after planning: every rank refuses it
        real(config)
        data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])

    monkeypatch.setattr(finetune_mod, "validate", validate_then_edit)
    with pytest.raises(RunError) as err:
        finetune(recipe, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and ("distributed training failed" in message or "without producing" in message)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".slmops-*"))


def _launch(dist: DistributedSection, tmp_path: Path) -> list[str]:
    from slmops.training.distributed import launch_command, topology

    return launch_command(tmp_path / "c.json", dist, topology(dist))


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_accelerate_config_file_is_passed_through(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    cmd = _launch(DistributedSection(num_processes=8, strategy="fsdp", config_file=str(config)), tmp_path)
    assert _flag(cmd, "--config_file") == str(config.resolve())
    assert _flag(cmd, "--num_processes") == "8" and "--multi_gpu" not in cmd
    plain = _launch(DistributedSection(num_processes=2), tmp_path)
    assert "--multi_gpu" in plain and plain[-3:] == ["-m", "slmops.training.distributed", str(tmp_path / "c.json")]
    assert (_flag(plain, "--num_machines"), _flag(plain, "--machine_rank")) == ("1", "0")


def test_an_accelerate_config_files_own_values_hold_where_no_flag_sets_them(tmp_path):
    from slmops.training.distributed import topology

    config = tmp_path / "two-nodes.yaml"
    config.write_text(
        "distributed_type: MULTI_CPU\nnum_processes: 4\nnum_machines: 2\nmachine_rank: 1\n"
        "main_process_ip: 10.0.0.7\nmain_process_port: 29400\n"
    )
    dist = DistributedSection(config_file=str(config))
    topo = topology(dist)
    assert (topo.processes, topo.machines, topo.rank, topo.host, topo.port) == (4, 2, 1, "10.0.0.7", 29400)
    cmd = _launch(dist, tmp_path)
    for flag in ("--num_processes", "--num_machines", "--machine_rank", "--multi_gpu"):
        assert flag not in cmd  # on the command line they would override the file
    # the file's address; its port is slmops' check-in, so the launcher's rendezvous takes the next one
    assert (_flag(cmd, "--main_process_ip"), _flag(cmd, "--main_process_port")) == ("10.0.0.7", "29401")
    # a flag (or recipe key) wins over the file, and only it is passed
    cmd = _launch(DistributedSection(config_file=str(config), machine_rank=0), tmp_path)
    assert _flag(cmd, "--machine_rank") == "0" and "--num_machines" not in cmd


def test_several_machines_launch_with_their_rank_and_machine_0s_address(tmp_path):
    dist = DistributedSection(num_processes=4, num_machines=2, machine_rank=1, main_address="node0:29500")
    cmd = _launch(dist, tmp_path)
    assert [_flag(cmd, f) for f in ("--num_processes", "--num_machines", "--machine_rank")] == ["4", "2", "1"]
    # slmops' own check-in listens on the port; the launcher's rendezvous is the next one
    assert (_flag(cmd, "--main_process_ip"), _flag(cmd, "--main_process_port")) == ("node0", "29501")
    torchrun = _launch(dist.model_copy(update={"launcher": "torchrun"}), tmp_path)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=2", "--master-addr=node0", "--master-port=29501"} <= set(
        torchrun
    )


@pytest.mark.parametrize(
    "dist, message",
    [
        (
            {"num_machines": 2, "machine_rank": 2, "main_address": "h:1"},
            "distributed.machine_rank 2 is outside 0..1 (num_machines 2)",
        ),
        (
            {"num_machines": 2, "num_processes": 2},
            "2 machines need machine 0's address: add --main-address HOST:PORT (the same on every machine)",
        ),
        (
            {"num_machines": 2, "num_processes": 3, "main_address": "h:29500"},
            "distributed.num_processes 3 (in all) does not divide over 2 machines; give each machine the same number",
        ),
    ],
)
def test_a_topology_that_cannot_work_is_one_line(dist, message):
    from slmops.training.distributed import topology

    with pytest.raises(RunError) as err:
        topology(DistributedSection(**dist))
    assert str(err.value) == message


def test_fsdp_and_deepspeed_are_refused_on_cpu_with_the_reason(tmp_path, tiny_model):
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: FSDP\n")
    for strategy, why in (("fsdp", "FSDP plugin needs a GPU"), ("deepspeed", "Intel's extension and oneCCL")):
        recipe = _recipe(
            tmp_path,
            tiny_model,
            SFT.format(batch=2)
            + f"distributed:\n  num_processes: 2\n  strategy: {strategy}\n  config_file: {config}\n",
            strategy,
        )
        with pytest.raises(RunError) as err:
            finetune(recipe, tmp_path / "out")
        message = str(err.value)
        assert message.startswith(f"distributed.strategy {strategy} is refused on CPU: ") and why in message
        assert message.endswith("; use strategy ddp (gloo) here") and "\n" not in message
        assert not (tmp_path / "out").exists()


def test_bad_distributed_settings(tmp_path, tiny_model):
    with pytest.raises(RecipeError, match="strategy deepspeed needs config_file"):
        _recipe(tmp_path, tiny_model, SFT.format(batch=2) + "distributed:\n  strategy: deepspeed\n", "ds")
    recipe = _recipe(
        tmp_path,
        tiny_model,
        SFT.format(batch=2) + "distributed:\n  num_processes: 2\n  strategy: fsdp\n  config_file: /nowhere/fsdp.yaml\n",
        "fsdp",
    )
    with pytest.raises(RunError, match="config_file /nowhere/fsdp.yaml not found"):
        finetune(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".slmops-*"))


# -- several machines, as two `slmops finetune` processes on loopback ------------------------------------------


def _two_free_ports() -> int:
    """A port whose next one is free too (slmops' check-in, then the launcher's rendezvous)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two free ports in a row")


def _node(recipe: Path, out: Path, rank: int, port: int, *extra: str, machines: int = 2):
    import subprocess
    import sys

    args = ["finetune", "--recipe", recipe, "-o", out, "--num-processes", machines, "--num-machines", machines]
    args += ["--machine-rank", rank, "--main-address", f"127.0.0.1:{port}", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "slmops.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _recipe_file(tmp_path: Path, model: Path, body: str, name: str) -> Path:
    head = f"model:\n  name: {model}\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n"
    return write_recipe(tmp_path / f"{name}.yaml", head + body)


@pytest.mark.slow  # two machines of one process each, then one process
@pytest.mark.parametrize("stage, body, launcher", [("sft", SFT, "accelerate"), ("dpo", DPO, "torchrun")])
def test_two_machines_match_one_process_with_the_same_global_batch(tmp_path, tiny_model, stage, body, launcher):
    port = _two_free_ports()
    recipe = _recipe_file(tmp_path, tiny_model, body.format(batch=2), "two")
    nodes = [_node(recipe, tmp_path / "two", r, port, "--set", f"distributed.launcher={launcher}") for r in (0, 1)]
    (code0, out0, err0), (code1, out1, err1) = (_finish(n) for n in nodes)
    assert code0 == 0, err0
    assert code1 == 0, err1
    # machine 1 says where the output went, and leaves nothing behind
    assert out1.strip() == (
        f"Machine 1 of 2 trained its share; machine 0 writes the adapter, the summary and the runs index, "
        f"to {tmp_path / 'two'} there"
    )
    assert not list(tmp_path.glob("two.machine-1*")) and not list(tmp_path.glob(".slmops-*"))
    finetune(_recipe(tmp_path, tiny_model, body.format(batch=4), "one"), tmp_path / "one")

    single, parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(parallel) > 0
    assert max(abs(a - b) for a, b in zip(single, parallel)) <= LOSS_TOLERANCE, (single, parallel)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2  # as for 2 processes on one machine, above


def _kill_tree(process) -> None:
    """A machine dies: its `slmops finetune`, the launcher in its own session and every training process."""
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _checkpoint_steps(folder: Path) -> list[int]:
    return sorted(
        int(c.name.split("-")[1])
        for c in folder.glob("work/checkpoints/checkpoint-*")
        if (c / "trainer_state.json").is_file()
    )


@pytest.mark.slow  # two machines, one killed mid-run, then both resumed
@pytest.mark.parametrize(
    "victim, line",
    [
        (1, "Error: machine 1 stopped answering ("),
        (0, "Error: machine 0 at 127.0.0.1:{port} stopped answering ("),
    ],
)
def test_a_killed_machine_stops_the_other_within_the_timeout_and_resume_completes(tmp_path, tiny_model, victim, line):
    import time

    from slmops.core.files import resume_folder

    port = _two_free_ports()
    body = (
        SFT.format(batch=2)
        .replace("max_steps: 6", "max_steps: 400\n  save_steps: 10")
        .replace("max_samples: 32", "max_samples: 96")
    )
    recipe = _recipe_file(tmp_path, tiny_model, body + "distributed:\n  timeout: 10\n", "long")
    out = tmp_path / "out"
    nodes = [_node(recipe, out, rank, port) for rank in (0, 1)]
    partial = resume_folder(out)
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(partial) and time.monotonic() < deadline and nodes[0].poll() is None:
        time.sleep(0.2)
    assert _checkpoint_steps(partial), _finish(nodes[0])[2][-2000:]
    _kill_tree(nodes[victim])
    killed = time.monotonic()
    code, _, err = _finish(nodes[1 - victim], timeout=120)
    stopped_after = time.monotonic() - killed
    assert code == 2, err[-3000:]
    assert _last_line(err).startswith(line.format(port=port)), err[-3000:]
    print(f"machine {1 - victim} stopped {stopped_after:.1f} s after the kill: {_last_line(err)}")  # -rP
    assert stopped_after < 10  # distributed.timeout
    assert not out.exists() and partial.is_dir()  # machine 0's checkpoints are kept for --resume

    step = _checkpoint_steps(partial)[-1]
    nodes = [_node(recipe, out, rank, port, "--resume") for rank in (0, 1)]
    (code0, _, err0), (code1, _, err1) = (_finish(n) for n in nodes)
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    assert f"Resuming {out} from checkpoints/checkpoint-{step} (step {step})" in err0
    assert f"from checkpoints/checkpoint-{step} (step {step})" in err1  # machine 1 resumes from the same step
    logged = [e["step"] for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert logged[-1] == 400 and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # two machines that disagree stop before training
def test_machines_with_different_recipes_are_refused_before_any_step(tmp_path, tiny_model):
    port = _two_free_ports()
    recipe = _recipe_file(tmp_path, tiny_model, SFT.format(batch=2), "same")
    nodes = [
        _node(recipe, tmp_path / "out", 0, port),
        _node(recipe, tmp_path / "out", 1, port, "--set", "training.learning_rate=0.02"),
    ]
    results = [_finish(n, timeout=300) for n in nodes]
    for code, _, err in results:
        assert code == 2, err[-2000:]
        assert _last_line(err).startswith("Error: machine 1's recipe differs from machine 0's ("), err[-2000:]
        assert _last_line(err).endswith("; run every machine with the same recipe, flags, data and model")
    assert not list(tmp_path.rglob("checkpoint-*")) and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".slmops-*")) and not list(tmp_path.glob("out.machine-*"))


def test_a_machine_that_cannot_reach_machine_0_stops_in_one_line(tmp_path, tiny_model):
    import time

    port = _two_free_ports()  # nothing listens there
    recipe = _recipe_file(tmp_path, tiny_model, SFT.format(batch=2) + "distributed:\n  timeout: 3\n", "alone")
    start = time.monotonic()
    code, _, err = _finish(_node(recipe, tmp_path / "out", 1, port), timeout=120)
    assert code == 2
    assert _last_line(err) == (
        f"Error: machine 1 cannot reach machine 0 at 127.0.0.1:{port} within 3 s (Connection refused); "
        "check --main-address and that machine 0 is running"
    )
    assert time.monotonic() - start < 60
    assert not list(tmp_path.glob(".slmops-*")) and not list(tmp_path.glob("out*"))


def test_machine_0_stops_when_another_never_checks_in(tmp_path, tiny_model):
    port = _two_free_ports()
    recipe = _recipe_file(tmp_path, tiny_model, SFT.format(batch=2) + "distributed:\n  timeout: 3\n", "alone")
    code, _, err = _finish(_node(recipe, tmp_path / "out", 0, port), timeout=120)
    assert code == 2
    assert _last_line(err) == (
        "Error: machine(s) 1 did not check in within 3 s; start every machine with the same --main-address"
    )
    assert not list(tmp_path.glob(".slmops-*")) and not (tmp_path / "out").exists()


def _readme_block(marker: str) -> str:
    import re

    from conftest import REPO

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README has {len(found)} bash blocks with {marker!r}"
    return found[0]


def _render_with_stand_ins(tmp_path: Path, script: str, env: dict) -> dict[int, dict]:
    """Run a README example with stand-ins: srun runs its command once per node (SLURM_NODEID 0..N-1),
    scontrol names node0..., and slmops is `slmops ... --dry-run --json` writing each machine's plan."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    bin_dir, out = tmp_path / "bin", tmp_path / "plans"
    bin_dir.mkdir()
    out.mkdir()
    stand_ins = {
        "srun": 'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit $?; done',
        "scontrol": 'for n in $(seq 0 $((SLURM_NNODES - 1))); do echo "node$n"; done',
        "slmops": f'r="${{SLURM_NODEID:-$MACHINE_RANK}}"; exec {sys.executable} -m slmops.cli "$@" --dry-run --json '
        f'-o "{out}/machine-$r" > "{out}/machine-$r.json"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script_file = tmp_path / "example.sh"
    script_file.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", str(script_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in out.glob("machine-*.json")}


@pytest.mark.slow  # two dry runs of the SmolLM2 recipe
def test_the_readme_slurm_example_launches_each_node_with_its_rank(tmp_path):
    plans = _render_with_stand_ins(tmp_path, _readme_block("#SBATCH"), {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "x"})
    assert sorted(plans) == [0, 1]
    for rank, plan in plans.items():
        cmd = plan["launch"]
        assert plan["machine"] == [rank, 2]
        assert [_flag(cmd, f) for f in ("--num_processes", "--num_machines", "--machine_rank")] == ["8", "2", str(rank)]
        assert (_flag(cmd, "--main_process_ip"), _flag(cmd, "--main_process_port")) == ("node0", "29501")


@pytest.mark.slow  # a dry run of the SmolLM2 recipe
def test_the_readme_torchrun_example_renders_torchrun(tmp_path):
    plans = _render_with_stand_ins(tmp_path, _readme_block("distributed.launcher=torchrun"), {"MACHINE_RANK": "1"})
    cmd = plans[1]["launch"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[3:8] == [
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=4",
        "--master-addr=node0",
        "--master-port=29501",
    ]
    assert cmd[-3:-1] == ["-m", "slmops.training.distributed"]


def test_machines_resume_from_the_newest_checkpoint_they_all_have(tmp_path):
    from slmops.training.checkin import _common_checkpoint
    from slmops.training.distributed import _keep_checkpoints_up_to

    machine_0 = {"checkpoints": [["checkpoints", 10], ["checkpoints", 20]]}  # saved step 20; machine 1 was killed
    machine_1 = {"checkpoints": [["checkpoints", 10]]}
    assert _common_checkpoint({0: machine_0, 1: machine_1}) == ["checkpoints", "10"]
    assert _common_checkpoint({0: machine_0, 1: {"checkpoints": [["checkpoints", 30]]}}) is None
    two_stages = {"checkpoints": [["checkpoints", 40]], "other": 1}
    assert _common_checkpoint(
        {
            0: {**two_stages, "checkpoints": [["checkpoints", 40], ["dpo-checkpoints", 8]]},
            1: {**two_stages, "checkpoints": [["checkpoints", 40], ["dpo-checkpoints", 8]]},
        }
    ) == [
        "dpo-checkpoints",
        "8",
    ]
    for folder in ("checkpoints/checkpoint-10", "checkpoints/checkpoint-20", "dpo-checkpoints/checkpoint-4"):
        (tmp_path / folder).mkdir(parents=True)
    _keep_checkpoints_up_to(tmp_path, ["checkpoints", "10"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/checkpoint-*")) == [
        "checkpoints/checkpoint-10"
    ]
