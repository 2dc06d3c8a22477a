"""A wheel install (`pip install .`, no source checkout around) lists and runs the shipped recipes."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """slmops built as a wheel and installed on its own into a folder, imported from there."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((root / "dist").glob("slmops-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        check=True,
        capture_output=True,
    )
    return root


def run_installed(root, *args):
    env = dict(os.environ, PYTHONPATH=str(root / "site"), SLMOPS_DATA_DIR=str(SHARED_DATA.resolve()))
    return subprocess.run(
        [sys.executable, "-m", "slmops.cli", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_wheel_lists_and_runs_shipped_recipes(wheel_install):
    where = subprocess.run(
        [sys.executable, "-c", "import slmops; print(slmops.__file__)"],
        cwd=wheel_install,
        env=dict(os.environ, PYTHONPATH=str(wheel_install / "site")),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(wheel_install / "site")), where  # the wheel's copy, not the checkout's
    listed = run_installed(wheel_install, "recipes", "list")
    assert listed.returncode == 0, listed.stderr
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == shipped
    out = wheel_install / "out"
    done = run_installed(wheel_install, "finetune", "--recipe", "smollm2-135m-sft-h4rmony", "--dry-run", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "olive_config.json").is_file() and (out / "recipe.yaml").is_file()
