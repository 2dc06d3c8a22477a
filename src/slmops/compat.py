"""Workarounds for measured bugs in pinned dependencies.

This is the only module that knows about such bugs. Each workaround has a test in
tests/test_compat.py that fails once the upstream package no longer needs it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
