"""The project's error types. Library code raises these; the CLI turns them into one line and exit 2."""


class SlmopsError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""


class RecipeError(SlmopsError):
    """The recipe (file, flags or --set overrides) is not valid."""


class DataError(SlmopsError):
    """The data cannot be found, read or normalised."""


class ModelError(SlmopsError):
    """The model cannot be found or loaded."""


class RunError(SlmopsError):
    """A run (fine-tune, export) failed in a way the user can act on."""
