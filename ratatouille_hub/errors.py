"""The package's one error root: every refusal of bad input is a `RatatouilleError`, which the CLI prints
as one `error:` line (exit 2). Anything else that escapes a command is a bug, and is reported as one.

Each stage keeps its own subclass for what only it refuses; they stay ValueErrors too, so Python callers
that caught ValueError before keep working.
"""


class RatatouilleError(Exception):
    """Bad input, refused with a line that names the culprit (a file, row, column, repo or flag)."""


class RecipeError(RatatouilleError, ValueError):
    """The recipe cannot run with these ingredients or this output folder."""


class InputError(RatatouilleError, ValueError):
    """An input file (recipe, plan, dataset row, image) that cannot be read as what it claims to be."""
