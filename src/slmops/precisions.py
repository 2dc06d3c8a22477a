"""The precisions and int4 methods an export can take, written once (CLI choices, recipe schema, export)."""

PRECISIONS = ("int4", "int8", "fp16", "fp32")
AUTO = "auto"  # export: build candidates, keep the fastest that meets --min-agreement (slmops.precision_search)
PRECISION_CHOICES = (*PRECISIONS, AUTO)
DEFAULT_MIN_AGREEMENT = 0.9
# int4 methods: the model builder's, and "gguf", which keeps the blocks of a GGUF-quantized source exactly
# (slmops' GgufBlocks pass). "auto" resolves per model: gguf where its weights are on a GGUF grid.
BUILDER_INT4_ALGOS = ("default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last")
INT4_ALGOS = ("auto", "gguf", *BUILDER_INT4_ALGOS)
FALLBACK_INT4_ALGO = "k_quant_mixed"  # for sources on no GGUF grid: the builder's most faithful method (README)
