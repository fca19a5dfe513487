"""docs/cli.md, generated from the parser so it cannot drift from the commands: the top-level help, then
every command's `--help`, under the headings the top-level help groups them by.

Regenerate it with `python -m ratatouille_hub.cli_reference docs/cli.md` (tests/test_cli.py fails, naming
this command, when it is out of date).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import COMMAND_GROUPS, PROGRAM, build_parser, command_parsers

REGENERATE = "python -m ratatouille_hub.cli_reference docs/cli.md"
WIDTH = 120  # the help's line width here, whatever the terminal that generates it (examples stay on one line)


def reference() -> str:
    """docs/cli.md's text."""
    parser = build_parser(PROGRAM, width=WIDTH)
    commands = command_parsers(parser)
    sections = [
        "# Command-line reference",
        f"Generated from the parser by `{REGENERATE}`; do not edit by hand. The same text is each command's "
        f"`--help`. Every command also runs as `hf ratatouille COMMAND` once the package is installed as an hf extension (see the README).",
        f"## {PROGRAM}",
        _block(parser.format_help()),
    ]
    for heading, names in COMMAND_GROUPS.items():
        sections.append(f"## {heading}")
        sections += [part for name in names for part in (f"### {name}", _block(commands[name].format_help()))]
    return "\n\n".join(sections) + "\n"


def _block(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(reference(), encoding="utf-8")
