"""Olive's ModelBuilder pass on a current onnxruntime-genai (a workaround, see slmops.core.compat).

olive-ai 0.13's ModelBuilder was written for onnxruntime-genai 0.14, and fails on 0.15 and later:
- it patches ``onnxruntime_genai.models.quantized_model`` (Olive-quantized checkpoints), a module
  removed in 0.16, and its patch calls ``make_matmul_int4``, renamed ``make_matmul_nbits``;
- it calls ``create_model`` with a plain dict of options, where 0.15+ first needs
  ``parse_extra_options`` (which loads the HF details ``create_model`` then reads);
- it passes the weight-quantization options under their ``int4_`` names, which 0.18 no longer
  reads (its help calls them aliases, but nothing maps them: LoRA MatMuls named in
  ``int4_nodes_to_exclude`` were quantized).

This subclass does what Olive's main branch does: no quantized-checkpoint patch (slmops builds
from float checkpoints only; the builder's own loaders read GPTQ/AWQ ones), and the options go
through ``parse_extra_options`` as the builder's command line would pass them.
tests/test_compat.py fails once Olive's own pass builds with the installed onnxruntime-genai.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from olive.passes.onnx.model_builder import ModelBuilder

# Olive's option names -> the builder's since 0.15 (the int4_ names are no longer read).
RENAMED = {
    "int4_accuracy_level": "accuracy_level",
    "int4_block_size": "block_size",
    "int4_is_symmetric": "is_symmetric",
    "int4_op_types_to_quantize": "op_types_to_quantize",
    "int4_nodes_to_exclude": "nodes_to_exclude",
    "int4_algo_config": "algo_config",
}


def option_text(key: str, value: Any) -> str:
    """One extra option as the builder's ``KEY=VALUE`` command line spells it."""
    key = RENAMED.get(key, key)
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        value = ("/" if key == "op_types_to_quantize" else ",").join(str(v) for v in value)
    return f"{key}={getattr(value, 'value', value)}"  # .value: IntEnum members (block size, accuracy level)


@contextmanager
def parsed_options() -> Iterator[None]:
    """Within the block, the builder's ``create_model`` parses its options first (0.15+ needs that)."""
    from onnxruntime_genai.models import builder

    original = builder.create_model

    def create_model(model_name, input_path, output_dir, precision, execution_provider, cache_dir, **options):
        texts = [option_text(key, value) for key, value in options.items()]
        parsed = builder.parse_extra_options(
            model_name, input_path, output_dir, precision, execution_provider, cache_dir, texts
        )
        return original(model_name, input_path, output_dir, precision, execution_provider, cache_dir, **parsed)

    builder.create_model = create_model
    try:
        yield
    finally:
        builder.create_model = original


class SlmopsModelBuilder(ModelBuilder):
    """ModelBuilder for onnxruntime-genai 0.15 and later."""

    @staticmethod
    def maybe_patch_quant():
        return  # the module Olive patches is gone; slmops never feeds it an Olive-quantized checkpoint

    def _run_for_config(self, model, config, output_model_path):
        with parsed_options():  # Olive imports create_model inside its run, so it takes this one
            return super()._run_for_config(model, config, output_model_path)
