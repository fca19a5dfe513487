"""The refusal contract every bad-input test checks, and the docs/errors.md table it keeps true.

A refusal is exit code 2, one `error: ...` line naming the culprit, the last on stderr (the progress lines
before it are the command's, docs/logging.md; with -q it is the only one), no traceback, and the output
folder (and everything beside it) exactly as it was. Each case's line, with temporary paths written as
placeholders, must appear in docs/errors.md; `RATATOUILLE_WRITE_ERRORS_MD=1 pytest tests/` rewrites the
table from the lines the tests see (conftest's session hook calls `write_docs`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ratatouille_hub import cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
SEEN: dict[str, tuple[str, str]] = {}  # case -> (what, normalised error line), in the order tests ran
_HEADING = re.compile(r"^## Bad input \(\d+ cases\)$", flags=re.M)


def snapshot(folder: Path, *, folder_times: bool = True) -> dict:
    """Every file and folder under `folder` with its size and modification time ({} when absent); without
    `folder_times`, a folder counts by its name alone (a staging folder made and removed leaves no entry,
    but changes its parent's time)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if folder_times or not p.is_dir() else 0
        for p in sorted(folder.rglob("*"))
    }


def normalise(line: str, placeholders: dict[str, Path | str]) -> str:
    """`line` with each placeholder's path written as the placeholder (longest paths first)."""
    for name, path in sorted(placeholders.items(), key=lambda item: -len(str(item[1]))):
        line = line.replace(str(path), name)
    return line


def fails_cleanly(
    case: str,
    what: str,
    argv: list[str],
    culprit: str,
    out: Path,
    capsys,
    placeholders: dict[str, Path | str],
    *,
    watch: Path | None = None,
) -> str:
    """Run `argv`; demand exit 2, one `error:` line naming `culprit`, no traceback, `out` untouched and no
    entry added beside it (nor anywhere under `watch`, when given); record the line for docs/errors.md."""
    watched = watch if watch is not None else out.parent
    before, around = snapshot(out), snapshot(watched, folder_times=False)
    assert cli.main(argv) == 2
    line = one_error_line(capsys, culprit)
    assert snapshot(out) == before  # nothing written (or, for a folder that existed, nothing changed)
    assert snapshot(watched, folder_times=False) == around  # no staging folder or stray file left beside it
    record(case, what, line, {"<out>": out, **placeholders})
    return line


def one_error_line(capsys, culprit: str) -> str:
    """What the command just printed: one `error:` line naming `culprit`, the last on stderr (progress precedes
    it there), and no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:] != [], captured.err
    assert culprit in lines[-1], lines[-1]
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


def record(case: str, what: str, line: str, placeholders: dict[str, Path | str]) -> None:
    """Keep `line` (paths written as placeholders) for docs/errors.md, and demand it is documented there."""
    line = normalise(line, placeholders)
    SEEN[case] = (what, line)
    if not os.environ.get("RATATOUILLE_WRITE_ERRORS_MD"):
        assert f"`{line}`" in DOCS.read_text(encoding="utf-8"), f"docs/errors.md lacks: {line}"


def _rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for row in re.findall(r"^\| (\S+) \| (.*) \| `(.*)` \|$", text, flags=re.M):
        rows[row[0]] = (row[1], row[2])
    return rows


def write_docs() -> None:
    """Rewrite docs/errors.md's table: the cases this session saw, kept beside the documented ones it did
    not run (a partial run updates what it saw); `RATATOUILLE_WRITE_ERRORS_MD=prune` keeps only the seen."""
    if not SEEN:
        return
    text = DOCS.read_text(encoding="utf-8")
    start, end = text.index("<!-- cases -->") + len("<!-- cases -->"), text.index("<!-- /cases -->")
    rows = {} if os.environ.get("RATATOUILLE_WRITE_ERRORS_MD") == "prune" else _rows(text[start:end])
    rows.update(SEEN)
    table = "\n".join(f"| {case} | {what} | `{line}` |" for case, (what, line) in rows.items())
    text = text[:start] + "\n| case | input | error line |\n|---|---|---|\n" + table + "\n" + text[end:]
    DOCS.write_text(_HEADING.sub(f"## Bad input ({len(rows)} cases)", text), encoding="utf-8")
