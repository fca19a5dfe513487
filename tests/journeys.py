"""The README's journeys: its `ratatouille-hub` command blocks, read from README.md, and how a test types
each line as a user would, on tiny models over the session's local Hub.

A README line is typed after these rules, and no others:
- SUBSTITUTIONS: each placeholder Hub id (and the PACS alias) becomes a repo of the journeys' own
  namespace on the local Hub. Local paths (./my-base, ./VLCS, out, soup, ...) stay as typed: the
  journey's working folder holds folders of those names.
- BUDGET: every command of a subcommand that trains gets that subcommand's small-budget flags appended
  (the last value of a flag wins, so `--runs 20` becomes `--runs 4`); nothing else is appended.
- `...` stands for the arguments of the block's previous line of the same subcommand.
- `$SLURM_ARRAY_TASK_ID`: the line runs once per array task, for each index of the plan.
- `<key>`: the key of the first run of the soup (out/runs/<key>/model).
- `--port 8080` takes a free port instead (the session may not own 8080).
- `*` expands as bash expands it (sorted; left as typed when nothing matches); `a && b` runs a, then b.
Lines of other programs are run by the tests BY_REFERENCE names.
"""

from __future__ import annotations

import glob
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROGRAM = "ratatouille-hub"
ARRAY_TASK = "$SLURM_ARRAY_TASK_ID"

# README id -> the journeys' repo; `{ns}` is the journeys' namespace of the session Hub.
SUBSTITUTIONS = {
    "PACS": "{ns}-data/pacs",
    "org/base": "{ns}-org/base",
    "me/pacs-soup": "{ns}-me/pacs-soup",
    "me/base-caltech101": "{ns}-me/base-caltech101",
    "alice/pacs-sketch": "{ns}-alice/pacs-sketch",
    "bob/pacs-sketch": "{ns}-bob/pacs-sketch",
}
BUDGET_RUNS = 4  # one run from the base and one from each of the three local fine-tunes of the Quickstart
_TRAINING = ("--steps", "4", "--batch-size", "4", "--image-size", "16", "--lr", "1e-3", "--lr-choices", "1e-3", "2e-3")
_RECIPE = (*_TRAINING, "--runs", str(BUDGET_RUNS), "--eval-every", "2", "--lp-steps", "5", "--lp-lr", "1e-2")
BUDGET = {
    "recycle": (*_RECIPE, "--warmup-steps", "2"),
    "plan": (*_RECIPE, "--warmup-steps", "2"),
    "intertrain": _TRAINING,
}
# Lines of other programs, and the tests that run them.
BY_REFERENCE = {
    "make demo": "tests/test_toyworld.py",
    "make test": ".ci/run",
    "accelerate launch": "tests/test_scale_out.py",
    "bash examples/slurm_array.sh": "tests/test_slurm_example.py",
}


@dataclass(frozen=True)
class Block:
    section: str  # the `## ` heading the block sits under
    lines: tuple[str, ...]  # its commands, continuations joined, comments dropped


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every ```bash block of the README with its section, in order."""
    text = README.read_text() if text is None else text
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```bash\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
            continue
        joined = match.group(2).replace("\\\n", " ")
        lines = [_drop_comment(line) for line in joined.splitlines()]
        blocks.append(Block(section, tuple(line for line in lines if line)))
    return blocks


def _drop_comment(line: str) -> str:
    """The line's words without its comment, each command quoted as the shell reads it, joined by ` && `."""
    commands, words = [], []
    for word in [*shlex.split(line, comments=True), "&&"]:
        if word == "&&":
            commands.append(shlex.join(words)) if words else None
            words = []
        else:
            words.append(word)
    return " && ".join(commands)


def commands_of(line: str) -> list[str]:
    """The commands of one line: `a && b` is two."""
    return line.split(" && ")


def program_commands(lines) -> list[str]:
    """The `ratatouille-hub` commands among `lines`, in order."""
    return [c for line in lines for c in commands_of(line) if c.startswith(PROGRAM + " ")]


def card_commands(text: str) -> list[str]:
    """The `ratatouille-hub ...` commands a card shows in code spans (its how-to-reproduce lines)."""
    return re.findall(rf"`({PROGRAM} [^`]+)`", text)


def by_reference(command: str) -> str | None:
    return next((test for prefix, test in BY_REFERENCE.items() if command.startswith(prefix)), None)


def substitute(command: str, ns: str) -> str:
    """The README's placeholder ids replaced by the journeys' repos (whole ids only, longest first)."""
    for placeholder in sorted(SUBSTITUTIONS, key=len, reverse=True):
        command = re.sub(
            rf"(?<![\w./-]){re.escape(placeholder)}(?![\w])", SUBSTITUTIONS[placeholder].format(ns=ns), command
        )
    return command


class Shell:
    """Types a block's commands as a user would, in one working folder, after the module docstring's rules."""

    def __init__(self, ns: str, cwd: Path, run, *, port: int = 0, array_tasks: int = BUDGET_RUNS):
        self.ns, self.cwd, self.run, self.port, self.array_tasks = ns, cwd, run, port, array_tasks
        self.previous: dict[str, list[str]] = {}  # subcommand -> its last arguments
        self.typed: list[str] = []  # the README commands typed so far, as the README shows them

    def argvs(self, command: str) -> list[list[str]]:
        """What `command` (one README command) runs: one argv, or one per array task."""
        words = shlex.split(substitute(command, self.ns))[1:]
        subcommand = words[0]
        if "..." in words:
            at = words.index("...")
            words = [subcommand, *self.previous[subcommand], *words[at + 1 :]]
        argv = [expanded for word in words for expanded in self._expand(word)]
        if self.port and "--port" in argv:
            argv[argv.index("--port") + 1] = str(self.port)
        self.previous[subcommand] = [w for w in argv[1:] if w != "--dry-run"]
        argv += BUDGET.get(subcommand, ())
        if ARRAY_TASK in argv:
            return [[str(task) if w == ARRAY_TASK else w for w in argv] for task in range(self.array_tasks)]
        return [argv]

    def _expand(self, word: str) -> list[str]:
        if "<key>" in word:
            word = word.replace("<key>", first_soup_run(self.cwd))
        if "*" in word:
            return sorted(glob.glob(word, root_dir=self.cwd)) or [word]
        return [word]

    def type(self, line: str) -> list[str]:
        """Run every command of one README line; returns the outputs. A failing command fails the journey."""
        outputs = []
        for command in commands_of(line):
            for argv in self.argvs(command):
                outputs.append(self.run(argv))
            self.typed.append(command)
        return outputs


def first_soup_run(cwd: Path) -> str:
    """The key of the soup's first run, as the user reads it in out/soup/results.json."""
    import json

    results = json.loads((cwd / "out" / "soup" / "results.json").read_text())
    member = results["soup"]["members"][0]
    return next(run["folder"] for run in results["runs"] if run["index"] == member).split("/")[-1]
