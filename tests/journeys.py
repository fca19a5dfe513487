"""The README's journeys: its `ratatouille-hub` command blocks, read from README.md, and how a test types
each line as a user would, on tiny models over the session's local Hub.

A README line is typed after these rules, and no others:
- NAMESPACES, ALIASES: each Hub id the README types (org/base, me/pacs-soup, alice/..., bob/..., and the
  PACS alias) becomes the same name in the journeys' own namespaces on the local Hub. Local paths
  (./my-base, ./VLCS, out, soup, ...) stay as typed: the working folder holds folders of those names.
- BUDGET: every command of a subcommand that trains gets that subcommand's small-budget flags appended
  (the last value of a flag wins, so `--runs 20` becomes `--runs 4`); nothing else is appended.
- `...` stands for the arguments of the block's previous line of the same subcommand.
- `$SLURM_ARRAY_TASK_ID`: the line runs once per array task, for each index of the plan the block's last
  planning command announced (`saved the plan of N runs`, `N distinct runs`): 0..N-1.
- `<key>`: the key of the first run of the soup (out/runs/<key>/model).
- `--port 8080` takes a free port instead (the session may not own 8080).
- `VAR=value ratatouille-hub ...` runs in a fresh process with VAR set (the HF clients read it at import).
- `*` expands as bash expands it (sorted; left as typed when nothing matches); `a && b` runs a, then b.
Lines of other programs in these blocks are run by the tests BY_REFERENCE names.

A card's how-to-reproduce command is typed as it stands in the card, in the folder the card was downloaded
to, with CARD_PLACEHOLDERS filled in (and no budget: the recipe it replays carries its own).
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROGRAM = "ratatouille-hub"
ARRAY_TASK = "$SLURM_ARRAY_TASK_ID"

# The README's Hub namespaces -> the journeys' own on the session Hub (`{ns}`: a namespace no other test uses),
# and the dataset the PACS alias names -> the journeys' tiny PACS.
NAMESPACES = {name: "{ns}-" + name for name in ("org", "me", "alice", "bob")}
ALIASES = {"PACS": "{ns}-data/pacs"}
BUDGET_RUNS = 4  # one run from the base and one from each of the three local fine-tunes of the Quickstart
SWEEP_RUNS = 2
_TRAINING = ("--steps", "4", "--batch-size", "4", "--image-size", "16", "--lr", "1e-3", "--lr-choices", "1e-3", "2e-3")
_RECIPE = (*_TRAINING, "--runs", str(BUDGET_RUNS), "--eval-every", "2", "--lp-steps", "5", "--lp-lr", "1e-2")
BUDGET = {
    "recycle": (*_RECIPE, "--warmup-steps", "2"),
    "plan": (*_RECIPE, "--warmup-steps", "2"),
    "intertrain": _TRAINING,
    "sweep": (*_RECIPE, "--warmup-steps", "2", "--runs", str(SWEEP_RUNS)),  # trials x strategies x domains: fewer
}
# A card's placeholders, and what each stands for.
CARD_PLACEHOLDERS = {
    "SOUP": "the soup: a folder to write, or the soup repo the card is on",
    "<this repo>": "the repo the card is on",
    "RUN": "a contributed run of the same recipe that is not in the soup yet",
}
# The README sections whose command blocks are journeys (one test each), and the commands of the cards.
JOURNEY_SECTIONS = (
    "Quickstart",
    "Replay and offline use",
    "Scaling out",
    "Sweeps: trials x strategies x held-out domains",
    "Soups that grow on the Hub",
)
CARD_SOURCES = (ROOT / "model_card_template.md", ROOT / "ratatouille_hub" / "card.py")
# Lines of other programs in the journeys' blocks, and the tests that run them.
BY_REFERENCE = {
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
    words = " ".join(shlex.quote(word) for word in shlex.split(line, comments=True))
    return " && ".join(command.strip() for command in words.split(" '&&' "))


def commands_of(line: str) -> list[str]:
    """The commands of one line: `a && b` is two."""
    return line.split(" && ")


def split_environment(command: str) -> tuple[dict[str, str], str]:
    """`VAR=value ... ratatouille-hub ...` -> ({VAR: value}, the command after the assignments)."""
    words, environment = command.split(" "), {}
    while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", words[0]):
        name, _, value = words.pop(0).partition("=")
        environment[name] = value
    return environment, " ".join(words)


def is_program(command: str) -> bool:
    return split_environment(command)[1].startswith(PROGRAM + " ")


def unrun_commands(text: str) -> list[str]:
    """The README's commands no journey runs: `ratatouille-hub` blocks outside JOURNEY_SECTIONS, and lines
    of other programs in the journeys' blocks that no test BY_REFERENCE runs."""
    unrun = []
    for block in readme_blocks(text):
        commands = [command for line in block.lines for command in commands_of(line)]
        if block.section not in JOURNEY_SECTIONS:
            unrun += [command for command in commands if is_program(command)]
        else:
            unrun += [command for command in commands if not is_program(command) and not by_reference(command)]
    return unrun


def card_source_commands() -> list[str]:
    """The `ratatouille-hub` commands the cards' sources (template and card.py) write into cards."""
    return [command for source in CARD_SOURCES for command in card_commands(source.read_text())]


def card_commands(text: str) -> list[str]:
    """The `ratatouille-hub ...` commands a card shows in code spans (its how-to-reproduce lines)."""
    return re.findall(rf"`({PROGRAM} [^`]+)`", text)


def fill(command: str, values: dict[str, str]) -> str:
    """A card command with its CARD_PLACEHOLDERS (whole words) replaced by `values`; every one must be given."""
    assert set(values) <= set(CARD_PLACEHOLDERS), values
    for placeholder, value in values.items():
        command = re.sub(rf"(?<![\w-]){re.escape(placeholder)}(?![\w-])", value, command)
    assert not any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", command) for p in CARD_PLACEHOLDERS), command
    return command


def by_reference(command: str) -> str | None:
    return next((test for prefix, test in BY_REFERENCE.items() if command.startswith(prefix)), None)


def substitute(command: str, ns: str) -> str:
    """The README's Hub ids moved into the journeys' namespaces (whole words only: ./org/x is a path)."""
    for alias, dataset in ALIASES.items():
        command = re.sub(rf"(?<![\w./-]){alias}(?![\w./-])", dataset.format(ns=ns), command)
    for name, namespace in NAMESPACES.items():
        command = re.sub(rf"(?<![\w./-]){name}/", namespace.format(ns=ns) + "/", command)
    return command


class Shell:
    """Types a block's commands as a user would, in one working folder, after the module docstring's rules."""

    def __init__(self, ns: str, cwd: Path, run, *, port: int = 0, budget: dict = BUDGET):
        self.ns, self.cwd, self.run, self.port, self.budget = ns, cwd, run, port, budget
        self.previous: dict[str, list[str]] = {}  # subcommand -> its last arguments
        self.array_tasks = 0  # runs in the plan the last planning command announced

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
        self.previous[subcommand] = argv[1:]
        argv += self.budget.get(subcommand, ())
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
            environment, command = split_environment(command)
            for argv in self.argvs(command):
                outputs.append(self.run(argv, environment) if environment else self.run(argv))
                if announced := re.search(r"saved the plan of (\d+) runs|^(\d+) distinct runs", outputs[-1], re.M):
                    self.array_tasks = int(announced.group(1) or announced.group(2))
        return outputs


def first_soup_run(cwd: Path) -> str:
    """The key of the soup's first run, as the user reads it in out/soup/results.json."""
    results = json.loads((cwd / "out" / "soup" / "results.json").read_text())
    member = results["soup"]["members"][0]
    return next(run["folder"] for run in results["runs"] if run["index"] == member).split("/")[-1]


# -- the world the README presumes ----------------------------------------------------------------------

VLCS_DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")


@dataclass(frozen=True)
class World:
    ns: str  # the journeys' namespace: README ids are substituted into it
    disk: Path  # the local folders the README types, copied into each working folder
    shas: dict[str, str]  # Hub repo id -> its seeded commit


def build_world(local_hub, ns: str, tiny_world, tiny_checkpoints, tmp_path_factory) -> World:
    """On the Hub, the base org/base with two community fine-tunes naming it, and PACS (the tiny 4-domain
    target); on disk, ./my-base, three fine-tunes of it, a DomainBed ./VLCS and an auxiliary ./caltech101."""
    from ratatouille_hub import testing
    from ratatouille_hub.toy import world as toyworld

    root = tmp_path_factory.mktemp("journeys")
    base, pacs = substitute("org/base", ns), substitute("PACS", ns)
    shas = {base: local_hub.seed_model(base, _with_card(tiny_checkpoints["base"], root / "hub-base"), downloads=100)}
    for k in (1, 2):
        finetune = _with_card(tiny_checkpoints[f"aux{k}"], root / f"hub-ft{k}", base_model=base)
        shas[f"{ns}-community/finetune-{k}"] = local_hub.seed_model(
            f"{ns}-community/finetune-{k}", finetune, downloads=10 * k
        )
    shas[pacs] = local_hub.seed_dataset(pacs, tiny_world.target)

    disk = root / "disk"
    shutil.copytree(tiny_checkpoints["base"], disk / "my-base")
    for name, source in (("finetune-a", "aux1"), ("finetune-b", "aux2")):
        shutil.copytree(tiny_checkpoints[source], disk / name)
    base_model = testing.tiny_resnet(0, names=[f"digit-{i}" for i in range(10)])
    third = testing.finetune_of(base_model, testing.tiny_resnet(3, num_labels=5), 103)
    testing.save_tiny_checkpoint(disk / "finetune-c", third, processor=testing.tiny_processor(16))
    _domainbed_folder(toyworld.target_dataset(per_class_per_domain=4, size=16), disk / "VLCS", VLCS_DOMAINS)
    testing.write_hub_dataset(toyworld.aux_datasets(per_class=4, size=16)["stripes"], disk / "caltech101")
    return World(ns, disk, shas)


def _domainbed_folder(dataset, root: Path, domains) -> Path:
    """`dataset`'s images in DomainBed's layout ROOT/<domain>/<class>/<image>, its domains renamed to `domains`."""
    names = dataset.features["label"].names
    renamed = dict(zip(sorted(set(dataset["domain"])), domains, strict=True))
    for k, row in enumerate(dataset):
        folder = root / renamed[row["domain"]] / names[row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{k:04d}.png")
    return root


def _with_card(folder: Path, root: Path, **metadata) -> Path:
    """A copy of a checkpoint folder with a Hub card carrying `metadata`."""
    from huggingface_hub import ModelCard

    shutil.copytree(folder, root)
    ModelCard(f"---\n{json.dumps({'library_name': 'transformers', **metadata})}\n---\n# model\n").save(
        root / "README.md"
    )
    return root
