"""Nothing leaves the machine: telemetry off everywhere, the hub offline unless a run needs it."""

from __future__ import annotations

import os

from slmops.core import compat

# onnxruntime / onnxruntime-genai queue telemetry events on Linux; only ORT_DISABLE_TELEMETRY
# stops them. HF_HUB_DISABLE_TELEMETRY stops the hub's usage pings.
_ALWAYS = {
    "ORT_DISABLE_TELEMETRY": "1",
    "OLIVE_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def go_offline(allow_hub: bool = False, olive: bool = True) -> None:
    """Turn every library's telemetry off and, unless allowed, keep the model hub offline.

    Call before importing transformers, datasets or onnxruntime: they read these at import time.
    olive=False is for commands that never run Olive (generate, verify, bench's engines): silencing
    Olive imports it, and with it torch (about 350 MB of memory).
    """
    os.environ.update(_ALWAYS)
    if not allow_hub:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    if olive:
        compat.silence_olive_telemetry()
