"""The `ratatouille-hub` command (also `hf ratatouille`, as an `hf` extension). Every command's flags are
generated from its options dataclass (config.py): names, types, defaults, required, help and `--help`
groups, so the CLI and the Python API agree, and a problem with an option is named by its flag.

Heavy libraries (torch, transformers, evaluate) are imported inside the commands, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import sys
import textwrap
import traceback
import typing
from collections.abc import Callable
from pathlib import Path

from . import logs
from .config import (
    GROUPS,
    AssembleOptions,
    ContributeOptions,
    DiagnoseOptions,
    DiscoverOptions,
    IntertrainConfig,
    MergeOptions,
    Options,
    PublishOptions,
    PushOptions,
    RecipeConfig,
    ResultsOptions,
    RunOptions,
    SweepConfig,
    TrackingOptions,
    UpdateOptions,
)
from .errors import RatatouilleError
from .safe_text import say

PROGRAM = "ratatouille-hub"
HF_EXTENSION = "hf-ratatouille"  # the console script `hf` runs for `hf ratatouille`
COMMAND_GROUPS = {  # how the top-level --help lists the commands, in this order
    "Recipe (train fine-tunes on a target, then average them)": (
        "recycle",
        "plan",
        "run",
        "assemble",
        "sweep",
        "intertrain",
    ),
    "Soups (merge and share checkpoints, no training)": ("merge", "update", "contribute", "push"),
    "Inspect": ("discover", "diagnose", "results"),
    "Tools": ("local-hub", "demo", "env"),
}

log = logging.getLogger(__name__)

METHOD_DOC = "The recipe, its protocol and reference numbers: docs/method.md in the repository."

EPILOG_RECYCLE = f"""\
examples:
  ratatouille-hub recycle --base ./base --target ./pacs --aux ./ft-a ./ft-b --test-domain sketch
  ratatouille-hub recycle --base org/base --target ./VLCS --dry-run  # the plan: runs, inits, cost
  ratatouille-hub recycle --config out/recipe.yaml            # replay a saved recipe
  ratatouille-hub recycle --config out/recipe.yaml --runs 4   # ... with one option changed
  ratatouille-hub recycle --base ./base --target ./pacs --test-domain all   # the DomainBed table
  accelerate launch --num_processes 4 -m ratatouille_hub recycle ...   # runs spread over 4 processes/GPUs
Rerunning the same command resumes: finished runs are reused, never recomputed, and a second launch on
the same --output trains only what no other process has claimed.
{METHOD_DOC}
"""

EPILOG_PLAN = """\
a job scheduler runs the plan one run per task, on any machines that share OUTPUT:
  ratatouille-hub plan --base org/base --target ./pacs --runs 20 --output out   # prints: 20 runs
  ratatouille-hub run out --index $SLURM_ARRAY_TASK_ID                         # one task per run
  ratatouille-hub assemble out                                                 # once all are done
examples/slurm_array.sh does this with an sbatch array and a dependent assembly job.
"""

EPILOG_GROW = """\
a soup that grows as people add runs (only weights travel):
  ratatouille-hub contribute out --to alice/pacs-sketch --index 0 1      # alice/pacs-sketch-run0, -run1
  ratatouille-hub assemble soup --from-hub alice/pacs-sketch-run0        # every run of that recipe
  ratatouille-hub update me/pacs-soup --add bob/pacs-sketch-run2         # one commit, no re-merge
"""

EPILOG_INTERTRAIN = f"""\
examples:
  ratatouille-hub intertrain --base microsoft/resnet-50 --dataset ./caltech101 --runs 2 --steps 2000
  ratatouille-hub intertrain --base me/base --dataset someone/cars --push-to-hub me/base-cars
Rerunning the same command reuses finished fine-tunes.
{METHOD_DOC}
"""

EPILOG_MERGE = """\
examples:
  ratatouille-hub merge ./run-a ./run-b --output soup
  ratatouille-hub merge alice/run0 alice/run1@v1.0 ./run-c --output soup --push-to-hub me/soup
  ratatouille-hub merge ./run-* --method greedy --target ./pacs --test-domain sketch --output soup
  ratatouille-hub merge --config soup/merge.yaml --output again   # the same bytes, wherever the Hub moved
"""


EPILOG_SWEEP = """\
examples:
  ratatouille-hub sweep --base ./base --target ./pacs --aux ./ft-a ./ft-b --strategy erm ratatouille --trials 3
  ratatouille-hub sweep --config out/sweep.yaml --trials 5     # two more trials; the first three are reused
spread over a job scheduler (one task per distinct run, on any machines that share the output):
  ratatouille-hub sweep --base ./base --target ./pacs --output out --plan-only   # prints: N distinct runs
  ratatouille-hub sweep --config out/sweep.yaml --index $SLURM_ARRAY_TASK_ID    # one task per run
  ratatouille-hub sweep --config out/sweep.yaml --assemble                      # once all are done
or over K processes or GPUs: accelerate launch --num_processes K -m ratatouille_hub sweep ...
Rerunning the same command resumes: finished runs and soups are reused, never recomputed.
"""

EPILOG_PUSH = """\
examples:
  ratatouille-hub push me/pacs-soup out/soup
  ratatouille-hub push me/pacs-soup out/soup --create-pr --commit-message "Soup of 20 runs"   # prints the PR's URL
  cd out && ratatouille-hub push me/pacs-soup              # FOLDER defaults to ./soup, or . when it is a model
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples, the command list), except that an unindented line wider
    than the help is wrapped: each description is one paragraph on one line. Indented lines are commands to
    copy, and stay whole."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            if len(line) > width and not line[:1].isspace()
            else indent + line
            for line in text.splitlines()
        )


class UsageError(RatatouilleError, ValueError):
    """A command line argparse cannot parse (an unknown flag, a missing one, a bad choice or number)."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse, whose usage errors are refusals like any other: one `error:` line that points at the
    command's --help, and exit code 2 (argparse's own prints the usage and exits the process)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class ConfigFile(argparse.Action):
    """`--config FILE`: the saved options may hold the required ones, so once a file is given no flag is
    required any more; the options' own check then names whatever is still missing, by its flag. (It changes
    the parser it belongs to: main builds one parser per command line.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relaxes: list[argparse.Action] = []

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        for action in self.relaxes:
            action.required = False


class ShowVersions(argparse.Action):
    """`--version`, read from the installed packages' metadata only when asked (argparse's version action
    takes its text when the parser is built, which every command does)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .environment import version_lines

        print(version_lines())
        parser.exit()


def flag(name: str) -> str:
    """The command-line flag of the options field `name`."""
    return "--" + name.replace("_", "-")


def add_options(
    parser: argparse.ArgumentParser,
    options: type[Options],
    groups: dict | None = None,
    *,
    config: ConfigFile | None = None,
) -> dict:
    """One flag (or positional) per field of the options dataclass, in its `--help` group; a required field is a
    required flag. Defaults are suppressed, so values from --config are overlaid and the dataclass's own defaults
    fill the rest (with `config`, the command's --config, a positional list may be left out and no flag is
    required once a file is given: the file may hold them)."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(options)
    for f in sorted(dataclasses.fields(options), key=lambda f: list(GROUPS).index(f.metadata["group"])):
        if f.metadata.get("cli") is False:  # recorded by the tool in recipe.yaml, never typed
            continue
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        if f.default is not False and f.default not in ("", None, ()):
            help_text += f" (default: {f.default})"
        positional = f.metadata.get("positional")
        required = bool(f.metadata.get("required")) and not positional
        if required:
            help_text += " (required, or from --config)" if config is not None else " (required)"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kwargs: dict = {"default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(hint) is tuple:
            metavar = "MODEL" if f.name in ("models", "aux") else "V"
            kwargs.update(nargs="*" if config is not None and positional else "+", type=args[0], metavar=metavar)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = args[0] if args else hint
        choices = f.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        if positional:
            if "nargs" not in kwargs and not f.metadata.get("required"):
                kwargs["nargs"] = "?"  # an optional positional, as `push REPO_ID [FOLDER]`
            parser.add_argument(f.name, **kwargs)
            continue
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(GROUPS[group_name])
        action = groups[group_name].add_argument(flag(f.name), dest=f.name, required=required, **kwargs)
        if required and config is not None:
            config.relaxes.append(action)
    return groups


def options_from_args(args: argparse.Namespace, options: type[Options] = RecipeConfig):
    """The options a command was given: --config's values (where the command has one, and they are the
    command's recipe: where to publish or report is never saved in one), then its flags. A problem is named as
    the user wrote it: by its key in the file (the file named first), else by its flag."""
    from .config import ConfigError

    config_file = getattr(args, "config", None) if options not in (PublishOptions, TrackingOptions) else None
    values = options.read_yaml(config_file) if config_file else {}
    fields = {f.name: f for f in dataclasses.fields(options)}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    try:
        return options.from_dict({**values, **flags})
    except ConfigError as error:
        from_file = {name for name in values if name not in flags}

        def name_of(option: str) -> str:
            return option if option in from_file or fields[option].metadata.get("positional") else flag(option)

        worded = error.worded(name_of)
        if any(problem.option in from_file for problem in error.problems):
            worded = f"{config_file}: {worded}"
        raise ConfigError(worded) from None


def _add_token_flag(groups: dict, parser: argparse.ArgumentParser) -> None:
    if "hub" not in groups:
        groups["hub"] = parser.add_argument_group(GROUPS["hub"])
    groups["hub"].add_argument(
        "--token", help="Hub token (default: HF_TOKEN or the saved login); never written anywhere"
    )


class Commands:
    """The subcommands being added, and the one line that lists each in the top-level --help."""

    def __init__(self, subparsers, formatter_class):
        self.subparsers = subparsers
        self.formatter_class = formatter_class
        self.lines: dict[str, str] = {}

    def add_parser(self, name: str, *, help: str, **kwargs) -> argparse.ArgumentParser:
        self.lines[name] = help
        return self.subparsers.add_parser(name, formatter_class=self.formatter_class, **kwargs)

    def grouped(self) -> str:
        """The commands under their COMMAND_GROUPS headings, one line each."""
        width = max(map(len, self.lines))
        return "\n\n".join(
            f"{heading}:\n" + "\n".join(f"  {name:<{width}}  {self.lines[name]}" for name in names)
            for heading, names in COMMAND_GROUPS.items()
        )


def _command(
    commands: Commands,
    name: str,
    options: type[Options],
    *,
    publish: bool = False,
    config: bool = False,
    tracking: bool = False,
    hub: bool = True,
    **kwargs,
):
    parser = commands.add_parser(name, **kwargs)
    config_file = None
    if config:
        config_file = parser.add_argument(
            "--config",
            type=Path,
            action=ConfigFile,
            help="the options an earlier run saved (recipe.yaml, sweep.yaml or merge.yaml) to start from; flags override "
            "its values",
        )
    groups = add_options(parser, options, config=config_file)
    if tracking:
        add_options(parser, TrackingOptions, groups)
    if publish:
        add_options(parser, PublishOptions, groups)
    if hub:  # a command that may reach the Hub takes --token
        _add_token_flag(groups, parser)
    return parser


REPORTING_COMMANDS = ("discover", "plan", "recycle", "assemble", "diagnose", "results")  # they take --format
FORMATS = ("human", "json", "quiet")


def _add_format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="human",
        help="how to print the report: human (tables), json (one JSON document on stdout, schema in docs/json.md; "
        "progress lines go to stderr), quiet (nothing: the exit code says whether it worked) (default: human)",
    )


@contextlib.contextmanager
def _progress_aside(args):
    """Progress lines while a command works: on stdout beside a human report; on stderr under --format json, so
    stdout holds the JSON document alone; nowhere under --format quiet."""
    form = getattr(args, "format", "human")
    if form == "human":
        yield
        return
    with contextlib.redirect_stdout(sys.stderr if form == "json" else io.StringIO()):
        yield


def _report(args, record, human: Callable[[], str]) -> None:
    """Print a command's record: `human()` as text, the record as JSON (records.py), or nothing."""
    form = getattr(args, "format", "human")
    if form == "json":
        from .records import to_json

        sys.stdout.write(to_json(record) + "\n")
        sys.stdout.flush()
    elif form == "human":
        say(human())


def program_name() -> str:
    """`hf ratatouille` when `hf` runs us as its extension (through the hf-ratatouille script), else ours."""
    return "hf ratatouille" if Path(sys.argv[0]).stem == HF_EXTENSION else PROGRAM


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by name (argparse has no public way to reach them)."""
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def build_parser(prog: str = PROGRAM, *, width: int | None = None) -> argparse.ArgumentParser:
    """Every command and its flags; `width` fixes the help's line width (docs/cli.md), else the terminal's."""

    def formatter_class(prog: str) -> argparse.HelpFormatter:
        return HelpFormatter(prog, width=width)

    parser = CommandLineParser(prog=prog, formatter_class=formatter_class, epilog=METHOD_DOC)
    parser.add_argument(
        "--version",
        action=ShowVersions,
        help="print the versions of ratatouille-hub, torch, transformers and huggingface_hub, and exit",
    )
    add_verbosity_flags(parser)
    commands = Commands(
        parser.add_subparsers(
            dest="command",
            required=True,
            metavar="COMMAND",
            help=f"one of the commands above; `{prog} COMMAND --help` lists its options",
        ),
        formatter_class,
    )

    recycle = _command(
        commands,
        "recycle",
        RecipeConfig,
        publish=True,
        config=True,
        tracking=True,
        help="fine-tune recycled checkpoints on a target and average them",
        description="Run the Model Ratatouille recipe: plan (every run, its init and hyperparameters), "
        "then the shared linear probe, one fine-tune per run (each from the base or a recycled fine-tune), "
        "the weight average, evaluation on the held-out domain, and a transformers model folder with its "
        "card in <output>/soup.",
        epilog=EPILOG_RECYCLE,
    )
    recycle.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (every run, its init, hparams, done or pending, the images it costs) and stop; "
        "writes nothing to --output (the Hub clients still cache what they fetch, under HF_HOME)",
    )
    _command(
        commands,
        "plan",
        RecipeConfig,
        config=True,
        help="save a recipe's plan in its output folder, for `run --index` and `assemble`",
        description="Plan the recipe exactly as recycle does (fetch, discover, vet, describe the target, every "
        "run's spec) and save it in --output (recipe.yaml, plan.json) without training; prints every run "
        "and how many there are.",
        epilog=EPILOG_PLAN,
    )
    _command(
        commands,
        "run",
        RunOptions,
        tracking=True,
        help="train one run of a saved plan (a scheduler's array task)",
        description="Train run --index of the plan saved in OUTPUT, on this process's device. Idempotent: a "
        "done run returns at once; a run another process is training is waited for (and trained if that "
        "process dies); the shared linear probe is trained by whichever run needs it first, once.",
        epilog=EPILOG_PLAN,
    )
    _command(
        commands,
        "assemble",
        AssembleOptions,
        tracking=True,
        help="build the soup of a saved plan from its finished runs, or of a recipe's runs on the Hub",
        description="Average, score and diagnose the finished runs of the plan saved in OUTPUT and write its "
        "soup folder(s), as recycle does at its end; refuses, naming them, while some runs are missing. With "
        "--from-hub RUN: the uniform soup of every contributed run of RUN's recipe, into OUTPUT.",
        epilog=EPILOG_PLAN + "\n" + EPILOG_GROW,
    )
    _command(
        commands,
        "contribute",
        ContributeOptions,
        help="push finished runs to the Hub, for anyone to average without the data",
        description="Push finished runs of the plan saved in OUTPUT as Hub models ORG/PREFIX-run<i> (one commit "
        "each): weights, config, processor, ratatouille.json (the recipe fingerprint: target at its revision, "
        "domains, split, labels, base, the shared linear-probe head) and a card naming the run's init "
        "(base_model, finetune) and its training-domain validation accuracy. `assemble SOUP --from-hub "
        "ORG/PREFIX-run0` then averages every run of the recipe.",
        epilog=EPILOG_GROW,
    )
    _command(
        commands,
        "update",
        UpdateOptions,
        help="add runs to a uniform soup, or remove them, exactly and without merging again",
        description="Update a uniform soup from the ingredient count and content hashes in its safetensors "
        "metadata: the new mean is (n x soup - removed + added) / n', per tensor in float64, stored in the "
        "soup's dtype. A run already in the soup, a run of another recipe (fingerprint), of other labels or "
        "other tensors is refused. A Hub soup: only it and the named runs are downloaded, and the update is "
        "pushed back in one commit with a rewritten card.",
        epilog=EPILOG_GROW,
    )
    intertrain = _command(
        commands,
        "intertrain",
        IntertrainConfig,
        publish=True,
        config=True,
        tracking=True,
        help="fine-tune a base on an auxiliary dataset: checkpoints for recycle to recycle",
        description="Inter-training (docs/method.md step 2): fine-tune --base on every image of --dataset and keep "
        "the last-step weights, as a transformers folder with a card naming the base and the dataset "
        "(base_model_relation: finetune). Pushed to the Hub, these are what recycle discovers. With "
        "--push-to-hub ID and --runs N > 1, fine-tune r goes to ID-r.",
        epilog=EPILOG_INTERTRAIN,
    )
    intertrain.add_argument(
        "--index",
        type=int,
        metavar="I",
        help="make fine-tune I only (0..runs-1): one scheduler array task each, then the same command without "
        "--index reuses them all",
    )
    sweep = _command(
        commands,
        "sweep",
        SweepConfig,
        config=True,
        tracking=True,
        help="the recipe over trials x strategies x held-out domains: one table, mean ± standard error",
        description="DomainBed's unit of evidence in one command: the recipe for every trial (seed, seed + 1, "
        "...) and strategy, with every domain held out in turn (--test-domain all), into OUTPUT/trial-<seed>/ "
        "(strategies of a trial share the runs they have in common); then one table of held-out accuracy, "
        "rows strategy: method, columns the domains and their average, each cell the mean ± standard error "
        "over the trials, and what the runs cost (OUTPUT/results.json, OUTPUT/cost.json).",
        epilog=EPILOG_SWEEP,
    )
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument("--plan-only", action="store_true", help="plan every cell, save the plans and stop")
    mode.add_argument(
        "--index", type=int, metavar="I", help="train run I of the saved sweep's flat run list (an array task)"
    )
    mode.add_argument(
        "--assemble", action="store_true", help="build the table from the saved sweep's runs, all of them done"
    )
    _command(
        commands,
        "merge",
        MergeOptions,
        publish=True,
        config=True,
        help="merge compatible checkpoints (folders or Hub ids) without training, with a card and merge.yaml",
        description="Merge transformers checkpoints tensor by tensor (streaming, float32 accumulation): local "
        "folders or Hub ids (id@rev pins a revision; each Hub input is pinned at the commit it resolves to). "
        "All inputs must share names, shapes, dtypes and labels. --method greedy ranks and selects on the "
        "training-domain validation split of --target, as recycle splits it (same --seed, --holdout-fraction "
        "and columns as the runs were trained with), and prints each candidate's score. OUTPUT gets the "
        "weights, a card (base_model, base_model_relation: merge, the method, the members at their revisions) "
        "and merge.yaml, which `merge --config OUTPUT/merge.yaml` replays to the same bytes.",
        epilog=EPILOG_MERGE,
    )
    _command(
        commands,
        "discover",
        DiscoverOptions,
        help="list fine-tunes of a base on the Hub and whether they can be recycled",
        description="Find fine-tunes of --base on the Hub (tag base_model:finetune:<base>, most downloaded first) "
        "and vet each from its metadata and safetensors headers alone, before any weight is downloaded: "
        "same backbone tensors (names, shapes, dtypes), safetensors weights, no remote code, and no "
        "training on the target dataset (leakage).",
    )
    _command(
        commands,
        "diagnose",
        DiagnoseOptions,
        help="measure accuracy, diversity and averageability of a set of runs",
        description="docs/method.md's three criteria on training-domain validation: each model's accuracy, the "
        "ratio-error of each pair (errors by one / errors by both: diversity), and accuracy along the "
        "straight weight path between them (the barrier: averageability). Models must classify the "
        "target's labels (e.g. out/runs/*/model); the split is recycle's for the same target options. Cost: one "
        "validation pass per model, and 9 per pair for its path, measured at 11 points t = 0, 0.1, ..., 1 (the "
        "ends are the models' own): N models take N + 9 N (N - 1) / 2 passes; recycle diagnoses only the best "
        "run against each other one (9 (N - 1) passes).",
    )
    _command(
        commands,
        "push",
        PushOptions,
        help="push a soup folder to the Hub in one commit",
        description="Push a model folder (weights, config, processor, card, recipe.yaml, results.json) to "
        "REPO_ID in one commit, in `hf upload`'s order. The pushed card takes the repo id as its title and "
        "model-index name and is validated first; rerunning a finished push makes no new commit.",
        epilog=EPILOG_PUSH,
    )

    _command(
        commands,
        "results",
        ResultsOptions,
        hub=False,
        help="print the results of a finished output folder (or of a soup folder)",
        description="Print the results table a finished recycle or assemble wrote (OUTPUT/soup/results.json, or "
        "with every domain held out the table over OUTPUT/soups/<domain>), or a soup folder's own; with "
        "--format json, the record itself (docs/json.md).",
    )
    for name in REPORTING_COMMANDS:
        _add_format_flag(commands.subparsers.choices[name])

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on a built-in toy world (offline, about 3 minutes on 2 cores)",
        description="Build a tiny world (a base, three careful community fine-tunes and a careless one, a 4-domain "
        "target), then "
        "compare ERM, model soups and Model Ratatouille on the held-out domain.",
    )
    demo.add_argument(
        "--output", type=Path, help="folder for everything (default: demo-output, or demo-smoke with --smoke)"
    )
    demo.add_argument(
        "--smoke",
        action="store_true",
        help="every stage on a world small enough to check an installation in under a minute; its numbers "
        "teach nothing",
    )

    hub = commands.add_parser(
        "local-hub",
        help="serve a local Hub-compatible registry (tests, offline work)",
        description="A local stand-in for the Hugging Face Hub on 127.0.0.1, backed by a folder. Point the "
        "clients at it with HF_ENDPOINT=http://127.0.0.1:PORT and HF_HUB_DISABLE_XET=1 (it stores large files by "
        "git-LFS, like a Hub without Xet; ratatouille-hub's own pushes need only HF_ENDPOINT). Not a production "
        "registry.",
    )
    hub.add_argument("--root", type=Path, required=True, help="folder that stores the repos")
    hub.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    hub.add_argument("--require-token", metavar="TOKEN", help="refuse writes without this bearer token")
    hub.add_argument(
        "--users-file",
        type=Path,
        metavar="FILE",
        help="per-user tokens, one 'TOKEN USER' line each (# comments allowed; refused unless chmod 600, and "
        "kept off the command line, where ps shows it): each user writes and reads private repos only in "
        "their own namespace, and every write needs a token",
    )
    commands.add_parser(
        "env",
        help="print versions, devices and Hub settings for a bug report (never the token)",
        description="Print what a bug report needs, as `hf env` does: the versions of Python, torch, transformers, "
        "datasets, huggingface_hub, safetensors and accelerate; CPU cores and CUDA/MPS devices; the Hub endpoint, "
        "cache and offline mode; whether a Hub token is present (never the token); and the environment variables "
        "that change what a run does.",
    )
    parser.description = (
        "Recycle fine-tunes of one base model into one weight-averaged model (Model Ratatouille).\n\n"
        + commands.grouped()
    )
    for command in commands.subparsers.choices.values():
        add_verbosity_flags(command, after_command=True)
    return parser


def add_verbosity_flags(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """-q, -v and --debug, accepted before the command and after it (`ratatouille-hub -q recycle ...` and
    `ratatouille-hub recycle ... -q`): after it they default to nothing, so they never undo one given before."""
    default = argparse.SUPPRESS if after_command else False
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="warnings, errors and results only (no progress)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="debug lines too, and the libraries' own progress bars and warnings (transformers, huggingface_hub, "
        "datasets), which are hidden otherwise",
    )
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")


def verbosity_of(args) -> int:
    return logs.QUIET if args.quiet else logs.VERBOSE if args.verbose else logs.DEFAULT


def run_intertrain(args) -> None:
    from .intertraining import intertrain
    from .recipe.executor import Worker

    config = options_from_args(args, IntertrainConfig)
    publish = options_from_args(args, PublishOptions)
    folders = intertrain(config, index=args.index, token=args.token, tracking=options_from_args(args, TrackingOptions))
    if not Worker.of_this_process().is_main:  # under accelerate launch: every rank trains, the main one reports
        return
    runs = range(config.runs) if args.index is None else [args.index]
    for run, folder in zip(runs, folders):
        say(f"fine-tune {run}: {folder}")
        if publish.push_to_hub:
            repo_id = publish.push_to_hub if config.runs == 1 else f"{publish.push_to_hub}-{run}"
            _push(folder, repo_id, publish, args.token)


def run_recycle(args) -> None:
    from .api import plan_recipe, recycle
    from .recipe import format_plans, plan_summary
    from .recipe.executor import Worker

    config = options_from_args(args, RecipeConfig)
    publish = options_from_args(args, PublishOptions)  # checked before anything trains
    output = Path(config.output)
    if args.dry_run:
        with _progress_aside(args):
            summary = plan_summary(plan_recipe(config, token=args.token), output)
        _report(args, summary, lambda: format_plans(summary))
        return
    with _progress_aside(args):
        results = recycle(config, token=args.token, tracking=options_from_args(args, TrackingOptions))
    if Worker.of_this_process().is_main:  # under accelerate launch: the tables print once
        _print_results(args, results, output, publish)


def run_plan(args) -> None:
    from .recipe import format_plans, plan_output, plan_summary

    config = options_from_args(args, RecipeConfig)
    output = Path(config.output)
    with _progress_aside(args):
        summary = plan_summary(plan_output(config, token=args.token), output)
    runs = sum(len(plan.runs) for plan in summary.plans)
    _report(
        args,
        summary,
        lambda: (
            f"{format_plans(summary)}\n\nsaved the plan of {runs} runs in {output / 'plan.json'}: train them with "
            f"`ratatouille-hub run {output} --index I` for I in 0..{runs - 1}, then `ratatouille-hub assemble {output}`"
        ),
    )


def run_run(args) -> None:
    from .recipe import run_index

    options = options_from_args(args, RunOptions)
    tracking = options_from_args(args, TrackingOptions)
    folder = run_index(Path(options.output), options.index, token=args.token, tracking=tracking)
    say(f"run {options.index}: {folder}")


def run_assemble(args) -> None:
    from .api import assemble
    from .provenance import SoupRecord

    options = options_from_args(args, AssembleOptions)
    with _progress_aside(args):
        assembled = assemble(options, token=args.token, tracking=options_from_args(args, TrackingOptions))
    if isinstance(assembled, SoupRecord):  # from the Hub: its [merge] line said what joined and where
        if args.format == "json":
            _report(args, assembled, str)
        return
    _print_results(args, assembled, Path(options.output), PublishOptions())


def _print_results(args, results, output: Path, publish: PublishOptions) -> None:
    """The results table and where the soup is, then the pushes asked for."""
    from .results import LeaveOneDomainOut, soup_subfolder
    from .safe_text import path_component

    if isinstance(results, LeaveOneDomainOut):
        where = f"soups: {output / 'soups'}/<domain>; table: {output / 'results.json'}"
        pushes = [
            (output / soup_subfolder(domain), f"{publish.push_to_hub}-{path_component(domain)}")
            for domain in results.per_domain
        ]
    else:
        where = f"{'soup' if results.is_average else 'best run'}: {output / 'soup'}"
        pushes = [(output / "soup", publish.push_to_hub)]
    _report(args, results, lambda: f"\n{results.format()}\n\n{where}")
    if publish.push_to_hub:
        with _progress_aside(args):
            for folder, repo_id in pushes:
                _push(folder, repo_id, publish, args.token)


def _push(folder: Path, repo_id: str, publish, token) -> None:
    from .publish import push_and_say

    push_and_say(folder, repo_id, publish, token)


def run_merge(args) -> None:
    from .merging import merge

    merge(options_from_args(args, MergeOptions), publish=options_from_args(args, PublishOptions), token=args.token)


def run_demo(args) -> None:
    import os

    from .localhub.server import LocalHub, hub_environment
    from .toy.design import DESIGN, SMOKE, check_design, record_design

    output, design = args.output or Path("demo-smoke" if args.smoke else "demo-output"), SMOKE if args.smoke else DESIGN
    check_design(output, design)  # before the Hub starts in that folder
    with LocalHub(output / "hub") as hub:
        log.info(f"[hub] local Hub stand-in at {hub.url} (store: {output / 'hub'})")
        if args.smoke:
            log.info("[demo] --smoke: a world too small to learn; what it prints checks the pipeline, not the method")
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, output / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        record_design(output, design)
        from .toy.demo import run_demo as demo

        with logs.library_output(verbosity_of(args)):
            demo(output, hub, design=design)


def run_discover(args) -> None:
    from .api import discover
    from .discovery import format_candidates

    with _progress_aside(args):
        discovery = discover(options_from_args(args, DiscoverOptions), token=args.token)
    _report(args, discovery, lambda: format_candidates(list(discovery.candidates)))


def run_diagnose(args) -> None:
    from .api import diagnose
    from .diagnostics import format_diagnosis

    options = options_from_args(args, DiagnoseOptions)
    with _progress_aside(args):
        diagnosis = diagnose(options, token=args.token)
    _report(args, diagnosis, lambda: format_diagnosis(diagnosis) + (f"\nplot: {options.plot}" if options.plot else ""))


def run_results(args) -> None:
    from .api import read_results

    results = read_results(options_from_args(args, ResultsOptions))
    _report(args, results, results.format)


def run_contribute(args) -> None:
    from .api import contribute

    contribute(options_from_args(args, ContributeOptions), token=args.token)


def run_update(args) -> None:
    from .api import update

    update(options_from_args(args, UpdateOptions), token=args.token)


def run_push(args) -> None:
    from .api import push

    push(options_from_args(args, PushOptions), token=args.token)


def run_local_hub(args) -> None:
    from .errors import InputError
    from .localhub.server import read_users_file, serve

    if not 0 < args.port < 65536:
        raise InputError(f"--port must be from 1 to 65535 (got {args.port})")
    users = read_users_file(args.users_file) if args.users_file else None
    serve(args.root, args.port, token=args.require_token, users=users)


def run_sweep(args) -> None:
    from .recipe.executor import Worker
    from .sweep import collect, format_sweep_plan, plan_sweep, run_sweep_index, sweep

    config = options_from_args(args, SweepConfig)
    tracking = options_from_args(args, TrackingOptions)
    output = Path(config.output)
    if args.index is not None:
        say(f"run {args.index}: {run_sweep_index(output, args.index, token=args.token, tracking=tracking)}")
    elif args.plan_only:
        say(format_sweep_plan(plan_sweep(config, token=args.token), output))
    else:
        if args.assemble:
            table = collect(output, token=args.token, tracking=tracking)
        else:
            table = sweep(config, token=args.token, tracking=tracking)
        if Worker.of_this_process().is_main:  # under accelerate launch: the table prints once
            say(f"\n{table.format()}\n\ntable: {output / 'results.json'}; cost: {output / 'cost.json'}")


def run_env(args) -> None:
    from .environment import environment_report, format_report

    say(format_report(environment_report()))


COMMANDS = {
    "recycle": run_recycle,
    "sweep": run_sweep,
    "plan": run_plan,
    "run": run_run,
    "assemble": run_assemble,
    "contribute": run_contribute,
    "update": run_update,
    "intertrain": run_intertrain,
    "merge": run_merge,
    "discover": run_discover,
    "diagnose": run_diagnose,
    "results": run_results,
    "push": run_push,
    "demo": run_demo,
    "local-hub": run_local_hub,
    "env": run_env,
}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 with one `error:` line for bad input (a command line argparse refuses, a
    `RatatouilleError`, an I/O or Hub failure); 1 with the traceback and a request to report it for anything
    else, which is a bug. The console scripts ratatouille-hub and hf-ratatouille both call it."""
    from .allocator import tune_allocator
    from .safe_text import terminal_safe

    tune_allocator()  # before torch allocates anything: PyTorch on CPU is 2-5x slower without it
    parser = build_parser(program_name())
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # as `hf` does: the commands, rather than an error about the missing one
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"error: {terminal_safe(_first_line(error))}", file=sys.stderr)
        return 2
    if args.quiet and args.verbose:
        print("error: -q/--quiet and -v/--verbose ask for opposite things: give one", file=sys.stderr)
        return 2
    try:
        # demo sets the libraries' environment before importing them; local-hub uses none of them
        with logs.verbosity(verbosity_of(args), libraries=args.command not in ("demo", "local-hub")):
            COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if not _is_user_facing(error):
            traceback.print_exc()
            print(bug_report(error), file=sys.stderr)
            return 1
        print(f"error: {terminal_safe(_first_line(error))}", file=sys.stderr)
        return 2
    return 0


def _is_user_facing(error: Exception) -> bool:
    """Our refusals, I/O errors (a full disk, a permission) and network or Hub failures; never a bug."""
    from .errors import RatatouilleError

    if isinstance(error, (RatatouilleError, OSError)):
        return True
    return type(error).__module__.split(".")[0] in ("httpx2", "httpx", "huggingface_hub")


def bug_report(error: Exception) -> str:
    from . import __version__

    return (
        f"error: internal error ({type(error).__name__}): this is a bug in ratatouille-hub {__version__}, not a "
        "problem with your input. Please report it with the traceback above and the command you ran."
    )


def _first_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"  # `[Errno 28] No space left...` names no file by itself
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
