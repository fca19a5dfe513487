"""docs/json.md as the tests read it: each section's table of fields, against the JSON a command printed.

A field the section does not list, or a top-level field out of the order it lists them in, is a schema that
drifted from its documentation; a `map ...` field is keyed by data (domains, labels, option names), so what
is under it is not listed.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "json.md"


def section_text(section: str) -> str:
    found = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", DOC.read_text(), flags=re.M | re.S)
    assert found, f"docs/json.md has no section {section!r}"
    return found.group(1)


def schema(section: str) -> dict[str, str]:
    """`path -> type` for each row of the table under `## <section>`."""
    rows = re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", section_text(section), re.M)
    return {m.group(1): m.group(2).strip() for m in rows}


def example(section: str) -> str:
    """The section's ```json example."""
    found = re.search(r"^```json\n(.*?)^```", section_text(section), flags=re.M | re.S)
    assert found, f"docs/json.md's {section!r} has no example"
    return found.group(1)


def undocumented(document, section: str) -> list[str]:
    """The fields of `document` that the section's table does not list, the fields it lists at the top
    level that `document` lacks, and the top-level fields that come in another order than the table's."""
    fields = schema(section)
    patterns = {path: re.compile("[^.\\[\\]]+".join(map(re.escape, re.split(r"<[^>]+>", path)))) for path in fields}
    problems: list[str] = []

    def walk(value, path: str) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                listed = next((p for p, pattern in patterns.items() if pattern.fullmatch(child)), None)
                if listed is None:
                    problems.append(f"not documented: {child}")
                elif not fields[listed].startswith("map"):
                    walk(item, child)

    walk(document, "")
    top = [path for path in fields if re.fullmatch(r"[A-Za-z_]+", path)]
    problems += [f"missing: {path}" for path in top if path not in document]
    if isinstance(document, dict):
        rows = list(fields)
        ranks = [
            (key, rows.index(listed))
            for key in document
            for listed in [next((p for p, pattern in patterns.items() if pattern.fullmatch(key)), None)]
            if listed is not None
        ]
        problems += [
            f"out of the documented order: {key}" for (key, rank), (_, before) in zip(ranks[1:], ranks) if rank < before
        ]
    return problems
