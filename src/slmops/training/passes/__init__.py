"""slmops' own training passes for Olive (DPO, QLoRA), registered by slmops.core.workflows.package_config()."""
