"""`slmops doctor`: is this environment able to run slmops, and if not, what to fix.

Each check returns ok, warn (something optional is missing or low) or fail (a command will not
work), with the fix spelled out. Nothing here downloads or builds anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path
from typing import Callable, Optional

from slmops.core.errors import SlmopsError
from slmops.core.models import ALIASES, DEFAULT_MODEL, cache_root, embedded_gguf

MIN_FREE_GB = 5.0  # a SmolLM2 run (checkpoints, an fp32 export, Olive's cache) fits in this
LOW_FREE_GB = 1.0


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def run_checks() -> list[Check]:
    checks: list[Check] = []
    for check in CHECKS:
        result = check()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def _python() -> Check:
    v = sys.version_info
    if v < (3, 10):
        return Check("python", "fail", f"{v.major}.{v.minor}", "use Python 3.10 or newer (3.11 is tested)")
    return Check("python", "ok", f"{v.major}.{v.minor}.{v.micro}")


def _pins() -> list[Check]:
    """Each dependency slmops pins (or bounds) against what is installed."""
    from packaging.requirements import Requirement

    try:
        declared = [Requirement(r) for r in requires("slmops") or []]
    except PackageNotFoundError:
        return [Check("slmops", "fail", "not installed as a package", "install it: pip install -e .")]
    checks = []
    for req in declared:
        if req.marker is not None:  # extras (test, qlora) are checked where they matter
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            checks.append(Check(req.name, "fail", "not installed", f"pip install '{req}'"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            checks.append(Check(req.name, "fail", f"{have}, slmops needs {req.specifier}", f"pip install '{req}'"))
        elif req.specifier and str(req.specifier).startswith("=="):
            checks.append(Check(req.name, "ok", have))
    return checks


def _runtime() -> Check:
    try:
        import onnxruntime as ort

        from slmops.core.choices import available_targets
    except ImportError as exc:
        return Check(
            "execution providers",
            "fail",
            f"onnxruntime does not import ({exc})",
            "pip install onnxruntime (or onnxruntime-gpu for CUDA)",
        )
    return Check(
        "execution providers",
        "ok",
        f"{', '.join(ort.get_available_providers())}; targets here: {', '.join(available_targets())}",
    )


def _bitsandbytes() -> Check:
    if importlib.util.find_spec("bitsandbytes") is None:
        return Check(
            "bitsandbytes",
            "warn",
            "not installed: QLoRA, 8-bit LoRA and paged-optimizer recipes will not run",
            "pip install 'slmops[qlora]'",
        )
    return Check("bitsandbytes", "ok", version("bitsandbytes"))


def _llamacpp() -> Check:
    if importlib.util.find_spec("llama_cpp") is None:
        return Check(
            "llama-cpp-python",
            "warn",
            "not installed: `slmops bench --baseline llamacpp` will not run",
            "pip install 'slmops[llamacpp]' (builds llama.cpp, about 5 minutes)",
        )
    return Check("llama-cpp-python", "ok", version("llama_cpp_python"))


def _trackers() -> Check:
    """Experiment trackers for --report-to: optional, off unless asked for."""
    have = {
        name: importlib.util.find_spec(module) is not None
        for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
    }
    shown = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in have.items())
    if not any(have.values()):
        return Check(
            "experiment trackers",
            "warn",
            f"none installed ({shown}): --report-to has nothing to log to",
            "pip install 'slmops[tensorboard]' (or wandb / mlflow)",
        )
    return Check("experiment trackers", "ok", f"{shown} (used only with --report-to)")


def _cache() -> Check:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check(
            "cache folder",
            "fail",
            f"{root} is not writable ({exc.strerror or exc})",
            "set SLMOPS_CACHE_DIR to a writable folder",
        )
    return Check("cache folder", "ok", f"{root} (writable)")


def _disk() -> list[Check]:
    checks = []
    for label, path in (("disk: cache", cache_root()), ("disk: outputs", Path.cwd())):
        free = _free_gb(path)
        if free is None:
            continue
        if free < LOW_FREE_GB:
            checks.append(
                Check(
                    label,
                    "fail",
                    f"{free:.1f} GB free at {path}",
                    "free some space, or point SLMOPS_CACHE_DIR / --output elsewhere",
                )
            )
        elif free < MIN_FREE_GB:
            checks.append(
                Check(
                    label,
                    "warn",
                    f"{free:.1f} GB free at {path}; a run can need {MIN_FREE_GB:.0f} GB",
                    "free some space, or point SLMOPS_CACHE_DIR / --output elsewhere",
                )
            )
        else:
            checks.append(Check(label, "ok", f"{free:.1f} GB free at {path}"))
    return checks


def _free_gb(path: Path) -> Optional[float]:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 1e9
    except OSError:
        return None


def _embedded_model() -> Check:
    alias = ALIASES[DEFAULT_MODEL]
    try:
        gguf = embedded_gguf(DEFAULT_MODEL)
    except SlmopsError as exc:
        return Check("embedded model", "fail", f"{alias.gguf_file} not found", str(exc).split("; ", 1)[-1])
    converted = cache_root() / "models" / DEFAULT_MODEL
    state = "converted" if (converted / "slmops-source.json").is_file() else "converted on first use (about 20 s)"
    return Check("embedded model", "ok", f"{gguf.name} in {alias.package}; HF folder {state}")


def _data() -> Check:
    folder = os.environ.get("SLMOPS_DATA_DIR")
    if not folder:
        return Check(
            "data",
            "warn",
            "SLMOPS_DATA_DIR is not set: recipes' datasets come from the hub",
            "offline, set SLMOPS_DATA_DIR to the folder holding the recipes' data files",
        )
    if not Path(folder).expanduser().is_dir():
        return Check(
            "data",
            "fail",
            f"SLMOPS_DATA_DIR={folder} is not a folder",
            "point SLMOPS_DATA_DIR at the folder holding the recipes' data files",
        )
    files = sorted(p.name for p in Path(folder).expanduser().iterdir() if p.is_file())
    return Check("data", "ok", f"SLMOPS_DATA_DIR={folder} ({len(files)} files)")


CHECKS: tuple[Callable, ...] = (
    _python,
    _pins,
    _runtime,
    _bitsandbytes,
    _llamacpp,
    _trackers,
    _cache,
    _disk,
    _embedded_model,
    _data,
)
