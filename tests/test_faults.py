"""Interrupts, kills, concurrent writers: slmops loses nothing and leaves nothing that looks complete."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SFT_DATA, write_recipe
from slmops.cli import cli
from slmops.core.files import LOCK_PREFIX, PARTIAL_PREFIX, output_lock, resume_folder

RECIPE = (
    """
model:
  name: {model}
data:
  file: """
    + str(SFT_DATA)
    + """
  max_samples: 16
  max_seq_len: 32
lora:
  r: 4
  alpha: 8
  target_modules: [q_proj, v_proj]
training:
  max_steps: {steps}
  save_steps: {save}
  logging_steps: 1
  batch_size: 2
  learning_rate: 1.0e-3
  dtype: float32
"""
)


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def spawn(*args, log: Path) -> subprocess.Popen:
    """The CLI in its own process (the way a user runs it), output to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "slmops.cli", *map(str, args)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the moment to interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


@pytest.fixture
def recipe(tmp_path, tiny_model):
    return write_recipe(tmp_path / "tiny.yaml", RECIPE.format(model=tiny_model, steps=150, save=5))


def steps_logged(out: Path) -> list[int]:
    lines = (out / "training_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow  # a 150-step fine-tune in a subprocess, killed and resumed
def test_killed_finetune_resumes_to_the_same_step_count(tmp_path, recipe):
    out = tmp_path / "out"
    partial = resume_folder(out)
    recipe.write_text(recipe.read_text() + "  report_to: [tensorboard]\n")
    proc = spawn("finetune", "-r", recipe, "-o", out, log=tmp_path / "first.log")
    wait_for(lambda: any(partial.glob("work/checkpoints/checkpoint-*/trainer_state.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.is_dir()  # nothing looks complete; the checkpoints are kept

    code, msg = run("finetune", "-r", recipe, "-o", out)  # the lock died with the process
    assert code == 2 and "has an interrupted run" in msg and "--resume" in msg

    code, msg = run("finetune", "-r", recipe, "-o", out, "--resume")
    assert code == 0, msg
    match = re.search(r"Resuming .* from checkpoints/checkpoint-(\d+) \(step (\d+)\)", msg)
    assert match and match.group(1) == match.group(2), msg
    step = int(match.group(2))
    assert json.loads((out / "run.json").read_text())["stages"]["sft"]["steps"] == 150
    assert steps_logged(out) == list(range(1, 151))  # the whole run's log (the trainer keeps it in checkpoints)
    # what each process trained, from its own TensorBoard file: the resumed one starts after the checkpoint
    first, resumed = _steps_per_process(out / "tensorboard" / "sft")
    assert first[0] == 1 and resumed == list(range(step + 1, 151))
    assert not partial.exists() and not list(tmp_path.glob(f"{LOCK_PREFIX}*"))


def _steps_per_process(logs: Path) -> list[list[int]]:
    """The loss steps each training process logged (each writes its own event file), in time order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for events in sorted(logs.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            out.append([e.step for e in accumulator.Scalars("train/loss")])
    return out


@pytest.mark.slow  # a fine-tune in a subprocess, killed at its first checkpoint
def test_resume_refuses_changed_training_and_nothing_to_resume(tmp_path, recipe):
    out = tmp_path / "out"
    code, msg = run("finetune", "-r", recipe, "-o", out, "--resume")
    assert code == 2 and msg == (
        f"Error: nothing to resume for '{out}': {resume_folder(out)} does not exist; run without --resume"
    )
    proc = spawn("finetune", "-r", recipe, "-o", out, log=tmp_path / "first.log")
    wait_for(lambda: any(resume_folder(out).glob("work/checkpoints/checkpoint-*/trainer_state.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, msg = run("finetune", "-r", recipe, "-o", out, "--resume", "--set", "training.learning_rate=0.5")
    assert code == 2 and "--resume: the recipe (its Olive config) changed since the interrupted run" in msg
    assert resume_folder(out).is_dir()  # a refused resume keeps the checkpoints


@pytest.mark.slow  # a fine-tune in a subprocess, interrupted
def test_interrupted_finetune_before_a_checkpoint_leaves_nothing(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(model=tiny_model, steps=100000, save=100000))
    out = tmp_path / "out"
    log = tmp_path / "log"
    proc = spawn("finetune", "-r", recipe, "-o", out, log=log)
    wait_for(lambda: "loss" in log.read_text(), proc)  # training has begun
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "r.yaml"]


@pytest.mark.slow  # 3 exports, 2 of them in interrupted subprocesses
def test_interrupted_export_leaves_nothing_and_a_rerun_succeeds(tmp_path, tiny_model):
    out = tmp_path / "bundle"
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = spawn("export", "-m", tiny_model, "-p", "fp32", "-o", out, log=tmp_path / "log")
        wait_for(lambda: any(tmp_path.glob(f"{PARTIAL_PREFIX}bundle-*/.work")), proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) != 0
        assert not out.exists()
        left = sorted(p.name for p in tmp_path.iterdir() if p.name != "log" and not p.name.startswith(LOCK_PREFIX))
        if sig == signal.SIGINT:
            assert left == []  # cleaned up on the way out
        else:
            assert [p[: len(PARTIAL_PREFIX)] for p in left] == [PARTIAL_PREFIX]  # a kill cannot clean up...
    code, msg = run("export", "-m", tiny_model, "-p", "fp32", "-o", out)
    assert code == 0, msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "log") == ["bundle"]  # ...the next run does
    assert run("verify", out)[0] == 0


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path, tiny_model, recipe):
    out = tmp_path / "out"
    with output_lock(out):
        code, msg = run("export", "-m", tiny_model, "-p", "fp32", "-o", out)
        assert code == 2
        assert msg == (
            f"Error: output folder '{out}' is being written by another slmops run (pid {os.getpid()}); "
            "wait for it to finish, or pass another -o/--output"
        )
        code, msg = run("finetune", "-r", recipe, "-o", out)
        assert code == 2 and "is being written by another slmops run" in msg
    assert not out.exists() and not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))


@pytest.mark.slow  # 2 fine-tunes in subprocesses at once
def test_two_runs_racing_for_one_output(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(model=tiny_model, steps=30, save=30))
    out = tmp_path / "out"
    procs = [spawn("finetune", "-r", recipe, "-o", out, log=tmp_path / f"{i}.log") for i in range(2)]
    codes = sorted(p.wait(timeout=600) for p in procs)
    logs = " ".join((tmp_path / f"{i}.log").read_text() for i in range(2))
    assert codes == [0, 2], logs
    assert "is being written by another slmops run" in logs or "already exists" in logs
    assert steps_logged(out) == list(range(1, 31))  # the winner's output, whole


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal, sys; from slmops.core.files import output_lock\n"
        f"with output_lock({str(out)!r}):\n    os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    with output_lock(out):  # not stuck behind a dead process
        pass


def _can_mount() -> bool:
    import shutil

    return (
        bool(shutil.which("unshare"))
        and subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.skipif(not _can_mount(), reason="needs unprivileged mount namespaces (Linux) for a small filesystem")
@pytest.mark.slow  # an export in a subprocess per size
@pytest.mark.parametrize("size", ["200k", "900k"])
def test_a_full_disk_fails_cleanly_and_leaves_nothing(tmp_path, tiny_model, size):
    # The output on a small tmpfs (in a private mount namespace): the export runs out of space
    # at some point, which depends on the size; whatever the point, one line, exit 2, nothing left.
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {small} && "
        f"{sys.executable} -m slmops.cli export -m {tiny_model} -p fp32 -o {small}/bundle; "
        f"echo rc=$?; ls -A {small}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    rc_line = next(line for line in proc.stdout.splitlines() if line.startswith("rc="))
    left = proc.stdout.splitlines()[proc.stdout.splitlines().index(rc_line) + 1 :]
    assert rc_line == "rc=2", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: no space left on the device")
    assert left == []


@pytest.mark.slow  # a DPO run in a subprocess, killed after a checkpoint and resumed
def test_killed_dpo_resumes_after_its_checkpoint(tmp_path, tiny_model):
    from conftest import PREFERENCE_DATA

    body = (
        f"model:\n  name: {tiny_model}\nlora:\n  r: 4\n  alpha: 8\n"
        f"dpo:\n  data:\n    file: {PREFERENCE_DATA}\n    max_samples: 16\n  max_length: 64\n  max_steps: 60\n"
        "  save_steps: 5\n  batch_size: 2\n  learning_rate: 5.0e-3\n  dtype: float32\n"
        "training:\n  logging_steps: 1\n  report_to: [tensorboard]\n"
    )
    recipe = write_recipe(tmp_path / "dpo.yaml", body)
    out = tmp_path / "out"
    proc = spawn("finetune", "-r", recipe, "-o", out, log=tmp_path / "first.log")
    wait_for(lambda: any(resume_folder(out).glob("work/*/checkpoint-*/trainer_state.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, msg = run("finetune", "-r", recipe, "-o", out, "--resume")
    assert code == 0, msg
    step = int(re.search(r"Resuming .* from \S+/checkpoint-\d+ \(step (\d+)\)", msg).group(1))
    assert json.loads((out / "run.json").read_text())["stages"]["dpo"]["steps"] == 60
    first, resumed = _steps_per_process(out / "tensorboard" / "dpo")
    assert first[0] == 1 and resumed == list(range(step + 1, 61))
