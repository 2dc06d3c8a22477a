"""Workarounds for measured bugs in pinned dependencies.

This is the only module that knows about such bugs, with two exceptions: an Olive pass must be
a class of its own, so the QLoRA workaround (Olive's QLoRA ignores target_modules) lives in
slmops.training.passes.qlora, and the ModelBuilder one (Olive 0.13's pass fails on onnxruntime-genai 0.15+)
in slmops.shipping.passes.model_builder. Each workaround has a test in tests/test_compat.py that fails once the
upstream package no longer needs it.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Model-builder options every export adds. onnxruntime-genai 0.18 (CPU) sizes a sliding-window layer's
# window-sized KV cache (the builder's default, windowed_kv_cache) to the search's max_length, and
# GroupQueryAttention refuses a cache smaller than the window: Gemma 2 (window 4096) failed on any prompt
# plus max_new_tokens under 4096. With the cache at full length, attention applies the window itself;
# models without a window build the same graph either way.
BUILDER_OPTIONS = {"windowed_kv_cache": False}


def silence_olive_telemetry() -> None:
    """Install a do-nothing Olive telemetry singleton before Olive makes its own.

    olive-ai 0.13 sends a heartbeat from ``Telemetry.__init__`` before it looks at
    OLIVE_DISABLE_TELEMETRY (only its CI detection skips it). A pre-made instance with no
    logger makes every later ``Telemetry()`` a no-op: ``log`` returns when ``_logger`` is None.
    """
    from olive.telemetry.telemetry import Telemetry

    if Telemetry._instance is not None:
        return
    quiet = object.__new__(Telemetry)
    quiet._initialized = True
    quiet._logger = None
    quiet._cache_handler = None
    Telemetry._instance = quiet


@contextmanager
def olive_cwd(folder: Path) -> Iterator[None]:
    """Run Olive from an empty working directory (every path in the config must be absolute).

    olive-ai 0.13's cache (``find_all_resources``) takes any config string that names an existing
    path relative to the working directory for a file: with a folder ``fp32`` there, ModelBuilder's
    ``precision: fp32`` becomes ``/that/dir/fp32`` and the run fails validation.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


_INTERRUPTS: list[int] = []  # signals honour_interrupts() caught during the current command


@contextmanager
def honour_interrupts() -> Iterator[None]:
    """Ctrl-C (and SIGTERM) stop the command even when a library swallows the KeyboardInterrupt.

    onnxruntime-genai 0.14's model builder read the generation config inside a bare
    ``except: pass``; a Ctrl-C landing there vanished and the export finished as if nothing
    happened (0.18 has no bare except left, but any library code run under Olive may do the same).
    The handler records the signal: raise_if_interrupted() (called before an output is
    published, and after Olive returns) and the end of the block raise it again.
    SIGTERM becomes an interrupt too, so a plain `kill` also removes partial output.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        _INTERRUPTS.append(signum)
        raise KeyboardInterrupt

    _INTERRUPTS.clear()
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise_if_interrupted()


def interrupt_handled() -> None:
    """The command dealt with the signal itself (`serve` drains and stops): do not raise it again."""
    _INTERRUPTS.clear()


def raise_if_interrupted() -> None:
    if _INTERRUPTS:
        _INTERRUPTS.clear()
        raise KeyboardInterrupt
