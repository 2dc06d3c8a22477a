"""Olive's QLoRA pass with the recipe's target_modules honoured (a workaround, see slmops.core.compat).

olive-ai 0.13's ``QLoRABase.get_quant_model`` replaces ``target_modules`` with every 4-bit linear
layer before it adds LoRA, so a q/v recipe trained all seven projections (4x the adapter, and not the
recipe). This subclass gives the LoRA step the modules the recipe named; without any it keeps
Olive's choice. tests/test_compat.py fails once Olive stops overriding them.
"""

from __future__ import annotations

from olive.passes.pytorch.lora import QLoRA


class SlmopsQLoRA(QLoRA):
    """QLoRA (bitsandbytes 4-bit base + LoRA) on the target modules the config names."""

    def get_quant_model(self, model, config, output_model_path):
        self._wanted = list(config.target_modules or [])
        return super().get_quant_model(model, config, output_model_path)

    def enable_lora(self, model, config, task=None, use_dora=False, adapter_path=None):
        if getattr(self, "_wanted", None):
            config.target_modules = self._wanted
        return super().enable_lora(model, config, task, use_dora=use_dora, adapter_path=adapter_path)
