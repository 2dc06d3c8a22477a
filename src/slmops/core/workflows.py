"""Olive workflows: the config skeleton, slmops' pass registry, validation, and one way to run them.

Every Olive run of slmops (finetune, export, each rank of a distributed fine-tune, each sweep trial)
goes through `run_workflow`: a copy of the config (Olive mutates it), slmops' package config, the
library's output on stderr (stdout is for results), an empty working folder (compat.olive_cwd),
Olive's log level from --verbose, Olive's swallowed exceptions turned into one error, and LoRA's
random init seeded from the recipe.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

from slmops.core.choices import PRECISIONS
from slmops.core.compat import olive_cwd, raise_if_interrupted
from slmops.core.errors import RunError, disk_full


def workflow(
    input_model: dict, passes: dict, work_dir: str, system: Optional[dict] = None, data_configs: Optional[list] = None
) -> dict:
    """An Olive workflow with its cache and output under work_dir, on this machine unless `system` names
    another (a Docker image or Python environment: Olive runs the passes there)."""
    name = "local_system" if system is None or system["type"] == "LocalSystem" else system["type"].lower()
    config: dict[str, Any] = {"input_model": input_model, "systems": {name: system or {"type": "LocalSystem"}}}
    if data_configs is not None:
        config["data_configs"] = data_configs
    return {
        **config,
        "passes": passes,
        "host": name,
        "target": name,
        "evaluate_input_model": False,
        "log_severity_level": 3,
        "cache_dir": f"{work_dir}/olive-cache",
        "output_dir": f"{work_dir}/olive-output",
    }


def run_workflow(config: dict, cwd: Path, what: str) -> Any:
    """Run an Olive workflow from the empty folder `cwd` and return Olive's WorkflowOutput.

    A failed pass (Olive raises it, or logs it and carries on without an output model) becomes one
    RunError: `what`, then the pass's exception; a full disk stays the OSError the CLI names.
    """
    from olive.workflows import run as olive_run

    if verbose():  # slmops --verbose: Olive's INFO log too
        config = dict(config, log_severity_level=1)
    with library_output_to_stderr() as olive_errors, olive_cwd(cwd):
        seed_lora_init(config)
        try:
            output = olive_run(copy.deepcopy(config), package_config=package_config())
        except Exception as exc:  # with one accelerator Olive re-raises a pass's exception instead of logging it
            olive_errors.last = exc
            olive_errors.fail(what)
    raise_if_interrupted()
    if output is None or not output.has_output_model():
        olive_errors.fail(what)  # Olive logged the pass's exception and carried on
    return output


def verbose() -> bool:
    return logging.getLogger("slmops").isEnabledFor(logging.INFO)


def package_config() -> dict:
    """Olive's own pass registry plus slmops' passes: a package config REPLACES Olive's registry."""
    import olive

    shipped = Path(olive.__file__).parent / "olive_config.json"
    config = json.loads(shipped.read_text())
    config["passes"].update(SLMOPS_PASSES)
    return config


def _registered(module_path: str, precisions: tuple[str, ...] = ("*",)) -> dict:
    """One pass in Olive's registry format: where it lives and what it runs on."""
    return {
        "module_path": module_path,
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": list(precisions),
        "supported_algorithms": [],
        "supported_quantization_encodings": [],
    }


# slmops' own Olive passes, by the name a workflow config's "type" uses.
SLMOPS_PASSES: dict[str, dict] = {
    "DPO": _registered("slmops.training.passes.dpo.DPO"),
    "SlmopsQLoRA": _registered("slmops.training.passes.qlora.SlmopsQLoRA"),
    "SlmopsLoRA": _registered("slmops.training.passes.packing.SlmopsLoRA"),
    "SlmopsPackedQLoRA": _registered("slmops.training.passes.packing.SlmopsPackedQLoRA"),
    # the precisions Olive registers its own ModelBuilder with
    "SlmopsModelBuilder": _registered("slmops.shipping.passes.model_builder.SlmopsModelBuilder", PRECISIONS),
    "GgufBlocks": _registered("slmops.shipping.passes.gguf_blocks.GgufBlocks"),
    "FuseLoRA": _registered("slmops.shipping.passes.fuse_lora.FuseLoRA"),
}


def validate_with_olive(config: dict, device: str = "cpu", provider: str = "CPUExecutionProvider") -> None:
    """Have Olive parse the workflow and build every pass's config class, without running anything.

    Raises RunError naming the pass and Olive's complaint; this is what --dry-run checks.
    """
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.package_config import OlivePackageConfig
    from olive.workflows.run.config import RunConfig
    from pydantic import ValidationError

    packages = OlivePackageConfig.parse_file_or_obj(package_config())
    try:
        run_config = RunConfig.parse_file_or_obj(copy.deepcopy(config))
    except (ValidationError, ValueError) as exc:
        raise RunError(f"Olive rejected the workflow config: {_first_line(exc)}") from None
    spec = AcceleratorSpec(device, provider)
    for name, pass_configs in run_config.passes.items():
        for pass_config in pass_configs:
            try:
                packages.import_pass_module(pass_config.type).generate_config(
                    spec, pass_config.config, disable_search=True
                )
            except (ValidationError, ValueError, KeyError) as exc:
                kind = config["passes"][name]["type"]
                raise RunError(f"Olive rejected pass '{name}' ({kind}): {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    """Olive's complaint in one line; for pydantic errors, 'field: message' per field."""
    if hasattr(exc, "errors"):
        seen: dict[str, str] = {}
        for err in exc.errors():
            seen.setdefault(str(err["loc"][0]) if err["loc"] else "config", err["msg"])
        return "; ".join(f"{field}: {msg}" for field, msg in seen.items())
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else type(exc).__name__


def seed_lora_init(config: dict) -> None:
    """Seed torch before Olive makes the adapter: its LoRA pass draws LoRA A at random before the
    trainer seeds anything, so two runs of one recipe started from different A matrices."""
    from transformers import set_seed

    first = next(iter(config["passes"].values()))
    set_seed(first.get("training_args", first).get("seed", 42))


class OliveErrors(logging.Filter):
    """Keeps the exception of Olive's last failed pass, and (unless --verbose) its traceback off the terminal.

    Olive catches a pass's exception, logs it with its traceback and carries on with no output
    model; slmops then reports the exception in one line (and a full disk as a full disk).
    """

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.last: Optional[BaseException] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.last = record.exc_info[1]
            if not self.verbose:
                record.exc_info, record.exc_text = None, None
        return True

    def fail(self, what: str) -> NoReturn:
        """Raise the failure: a full disk as the exception itself (the CLI names it), else one RunError line."""
        exc = self.last
        if exc is not None and disk_full(exc) is not None:
            raise exc
        why = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})" if exc is not None else ""
        raise RunError(f"{what}{why}; rerun with --verbose to see Olive's log")


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[OliveErrors]:
    """Olive logs and the trainer's loss dicts go to stderr: stdout is for results (--json).

    Yields the OliveErrors filter that watched Olive's log.
    """
    errors = OliveErrors(verbose=verbose())
    olive = logging.getLogger("olive")
    olive_handlers = [h for h in olive.handlers if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout]
    for stdout_handler in olive_handlers:
        stdout_handler.setStream(sys.stderr)
    for handler in olive.handlers:
        handler.addFilter(errors)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield errors
    finally:
        for handler in olive.handlers:
            handler.removeFilter(errors)
        for stdout_handler in olive_handlers:
            stdout_handler.setStream(sys.stdout)
