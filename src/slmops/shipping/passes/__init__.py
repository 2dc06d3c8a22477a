"""slmops' own export passes for Olive (model builder, FuseLoRA, GgufBlocks), registered by slmops.core.workflows.package_config()."""
