"""Strings that come from someone else (a dataset, a Hub repo, a card, a contributor) made safe for the
places we put them: the terminal and the file system. Card text has its own quoting (card.py)."""

from __future__ import annotations

import hashlib
import re
import sys

_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]+")
MAX_COMPONENT = 64  # short enough that any staging or lock name built from it stays under NAME_MAX (255)


def terminal_safe(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, line breaks, bidi overrides)
    written as its Python escape, so a hostile name can neither clear the screen nor forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def path_component(name: str) -> str:
    """A folder name for `name` that never leaves its parent: letters, digits, `.`, `_` and `-` only, not
    hidden, at most 64 characters; a name that had to change carries a hash of the original, so two
    different names never share a folder."""
    slug = _UNSAFE_IN_NAMES.sub("_", name).strip("._-")[: MAX_COMPONENT - 9]
    if slug == name and slug:
        return slug
    return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}".lstrip("-")


def say(text: str) -> None:
    """Print a result (a table, the summary a command ends with) on stdout, each line escaped, since lines
    name datasets, repos and folders that others chose. Progress and warnings go to the logger (logs.py)."""
    # one write of the whole text and its newline: print writes them apart, so unbuffered processes that share
    # a stdout (accelerate's ranks under PYTHONUNBUFFERED) glued one rank's line onto another's
    sys.stdout.write("\n".join(terminal_safe(line) for line in text.split("\n")) + "\n")
    sys.stdout.flush()
