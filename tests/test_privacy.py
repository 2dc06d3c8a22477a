import os

import pytest

from conftest import FIXTURES, SFT_DATA, write_recipe
from slmops.core.privacy import go_offline
from slmops.training.recipe import load_recipe, recipe_needs_hub


def test_offline_switches(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "ORT_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)
    go_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    assert os.environ["OLIVE_DISABLE_TELEMETRY"] == "1"


def test_hub_only_when_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(FIXTURES))
    local = write_recipe(tmp_path / "a.yaml", f"data:\n  dataset: org/ds\n  file: {SFT_DATA.name}\n")
    assert not recipe_needs_hub(load_recipe(str(local)))  # found in SLMOPS_DATA_DIR
    monkeypatch.setenv("SLMOPS_DATA_DIR", str(tmp_path))
    assert recipe_needs_hub(load_recipe(str(local)))  # not found locally: the hub dataset is needed
    hub_model = write_recipe(tmp_path / "b.yaml", "model:\n  name: org/m\ndata:\n  file: x.jsonl\n")
    assert recipe_needs_hub(load_recipe(str(hub_model)))


def _can_trace() -> bool:
    import shutil
    import subprocess

    if not (shutil.which("strace") and shutil.which("unshare")):
        return False
    return subprocess.run(["unshare", "-rn", "strace", "-qq", "-o", "/dev/null", "true"]).returncode == 0


def traced(tmp_path, *args) -> tuple:
    """Run the CLI in a network namespace with no network, under strace's connect() trace."""
    import re
    import subprocess
    import sys

    log = tmp_path / f"connect-{args[0]}.log"
    cmd = [
        "unshare",
        "-rn",
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=connect",
        "-e",
        "signal=none",
        "-o",
        str(log),
        sys.executable,
        "-m",
        "slmops.cli",
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    outbound = [
        line
        for line in log.read_text().splitlines()
        if re.search(r"sa_family=AF_INET6?\b", line) and not re.search(r'"127\.0\.0\.1"|"::1"', line)
    ]
    return proc, outbound


@pytest.mark.skipif(not _can_trace(), reason="needs strace and unprivileged network namespaces (Linux)")
@pytest.mark.slow  # finetune, export and generate, each a traced subprocess
def test_finetune_export_generate_attempt_no_connection(tmp_path, tiny_model):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
model: {{name: {tiny_model}}}
data: {{file: {SFT_DATA}, max_samples: 8, max_seq_len: 32}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
training: {{max_steps: 2, batch_size: 2, dtype: float32}}
""",
    )
    steps = [
        ("finetune", "-r", recipe, "-o", tmp_path / "run"),
        ("export", "-m", tiny_model, "-a", f"a={tmp_path / 'run'}", "-o", tmp_path / "bundle"),
        ("generate", tmp_path / "bundle", "-a", "a", "-p", "hello", "--max-new-tokens", "4"),
    ]
    for args in steps:
        proc, outbound = traced(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert outbound == [], f"{args[0]} tried to connect: {outbound[:5]}"
