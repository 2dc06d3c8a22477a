"""The project's error types. Library code raises these; the CLI turns them into one line and exit 2."""

from __future__ import annotations

import errno
from typing import Optional


class SlmopsError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""

    exit_code = 2


class CheckFailed(SlmopsError):
    """A check ran and its result is below the bar (parity, --min-agreement): exit 1, like a failing test."""

    exit_code = 1


class RecipeError(SlmopsError):
    """The recipe (file, flags or --set overrides) is not valid."""


class DataError(SlmopsError):
    """The data cannot be found, read or normalised."""


class ModelError(SlmopsError):
    """The model cannot be found or loaded."""


class RunError(SlmopsError):
    """A run (fine-tune, export) failed in a way the user can act on."""


def disk_full(exc: Optional[BaseException]) -> Optional[OSError]:
    """The ENOSPC / EDQUOT OSError behind `exc`, however deep a library wrapped it; None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "No space left on device" in str(exc) and not isinstance(exc, OSError):
            return OSError(errno.ENOSPC, "No space left on device")
        exc = exc.__cause__ or exc.__context__
    return None
