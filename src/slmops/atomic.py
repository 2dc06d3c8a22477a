"""Outputs appear whole or not at all: build in a hidden sibling folder, rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slmops.errors import RunError

PARTIAL_PREFIX = ".slmops-partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; rename it to `target` if the block succeeds.

    On any error or interrupt the temporary folder is removed, so no half-written output ever
    carries the target's name. An existing target is never overwritten.
    """
    target = Path(target).absolute()  # configs built inside name absolute paths (Olive runs elsewhere)
    if target.exists():
        raise RunError(f"output folder '{target}' already exists; pass another -o/--output, or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            raise RunError(f"output folder '{target}' appeared while this run was writing; pass another -o/--output")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
