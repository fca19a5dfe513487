"""Errors shared by several stages (each stage keeps its own for what only it refuses)."""


class RecipeError(ValueError):
    """The recipe cannot run with these ingredients or this output folder."""
