"""The `ratatouille-hub` command. Every command's flags are generated from its options dataclass
(config.py): names, types, defaults, help and `--help` groups, so the CLI and the Python API agree.

Heavy libraries (torch, transformers, evaluate) are imported inside the commands, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
import typing
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
    RunOptions,
    SweepConfig,
    UpdateOptions,
)
from .safe_text import say

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


def add_options(
    parser: argparse.ArgumentParser, options: type[Options], groups: dict | None = None, *, config: bool = False
) -> dict:
    """One flag (or positional) per field of the options dataclass, in its `--help` group. Defaults are
    suppressed, so values from --config are overlaid and the dataclass's own defaults fill the rest (with
    --config, a positional list may be left out: the file gives it)."""
    groups = {} if groups is None else groups
    hints = typing.get_type_hints(options)
    for f in sorted(dataclasses.fields(options), key=lambda f: list(GROUPS).index(f.metadata["group"])):
        if f.metadata.get("cli") is False:  # recorded by the tool in recipe.yaml, never typed
            continue
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        if f.default is not False and f.default not in ("", None, ()):
            help_text += f" (default: {f.default})"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kwargs: dict = {"default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(hint) is tuple:
            metavar = "MODEL" if f.name in ("models", "aux") else "V"
            kwargs.update(nargs="*" if config and f.metadata.get("positional") else "+", type=args[0], metavar=metavar)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = args[0] if args else hint
        choices = f.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(GROUPS[group_name])
        groups[group_name].add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return groups


def options_from_args(args: argparse.Namespace, options: type[Options] = RecipeConfig):
    """The options a command was given: --config's values (where the command has one, and they are the
    command's recipe: where to publish is never saved in one), then its flags."""
    from .config import ConfigError

    config_file = getattr(args, "config", None) if options is not PublishOptions else None
    values = options.read_yaml(config_file) if config_file else {}
    names = {f.name for f in dataclasses.fields(options)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    try:
        return options.from_dict({**values, **flags})
    except ConfigError as error:
        from_file = [k for k in values if k not in flags]
        if any(problem.startswith(tuple(from_file)) for problem in str(error).split("; ")):
            raise ConfigError(f"{config_file}: {error}") from None
        raise


def _add_token_flag(groups: dict, parser: argparse.ArgumentParser) -> None:
    if "hub" not in groups:
        groups["hub"] = parser.add_argument_group(GROUPS["hub"])
    groups["hub"].add_argument(
        "--token", help="Hub token (default: HF_TOKEN or the saved login); never written anywhere"
    )


def _command(commands, name: str, options: type[Options], *, publish: bool = False, config: bool = False, **kwargs):
    parser = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if config:
        parser.add_argument(
            "--config",
            type=Path,
            help="the options an earlier run saved (recipe.yaml, sweep.yaml or merge.yaml) to start from; flags override "
            "its values",
        )
    groups = add_options(parser, options, config=config)
    if publish:
        add_options(parser, PublishOptions, groups)
    _add_token_flag(groups, parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratatouille-hub",
        description="Recycle fine-tunes of one base model into one weight-averaged model (Model Ratatouille).",
        epilog=METHOD_DOC,
    )
    add_verbosity_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recycle = _command(
        commands,
        "recycle",
        RecipeConfig,
        publish=True,
        config=True,
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
        help="fine-tune a base on an auxiliary dataset: checkpoints for recycle to recycle",
        description="Inter-training (METHOD.md step 2): fine-tune --base on every image of --dataset and keep "
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
        description="METHOD.md's three criteria on training-domain validation: each model's accuracy, the "
        "ratio-error of each pair (errors by one / errors by both: diversity), and accuracy along the "
        "straight weight path between them (the barrier: averageability). Models must classify the "
        "target's labels (e.g. out/runs/*/model); the split is recycle's for the same target options.",
    )
    _command(
        commands,
        "push",
        PushOptions,
        help="push a soup folder to the Hub in one commit",
        description="Push a soup folder (weights, config, processor, card, recipe.yaml, results.json) in one "
        "commit. The card is validated first; rerunning a finished push makes no new commit.",
    )

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on a built-in toy world (offline, about 2 minutes)",
        description="Build a tiny world (a base, three community fine-tunes, a 4-domain target), then "
        "compare ERM, model soups and Model Ratatouille on the held-out domain.",
    )
    demo.add_argument(
        "--output", type=Path, default=Path("demo-output"), help="folder for everything (default: demo-output)"
    )

    hub = commands.add_parser(
        "local-hub",
        help="serve a local Hub-compatible registry (tests, offline work)",
        description="A local stand-in for the Hugging Face Hub on 127.0.0.1, backed by a folder. Point the "
        "clients at it with HF_ENDPOINT=http://127.0.0.1:PORT and HF_HUB_DISABLE_XET=1. Not a production registry.",
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
    for command in commands.choices.values():
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
    from .intertrain import intertrain
    from .recipe.executor import Worker

    config = options_from_args(args, IntertrainConfig)
    publish = options_from_args(args, PublishOptions)
    folders = intertrain(config, index=args.index, token=args.token)
    if not Worker.of_this_process().is_main:  # under accelerate launch: every rank trains, the main one reports
        return
    runs = range(config.runs) if args.index is None else [args.index]
    for run, folder in zip(runs, folders):
        say(f"fine-tune {run}: {folder}")
        if publish.push_to_hub:
            repo_id = publish.push_to_hub if config.runs == 1 else f"{publish.push_to_hub}-{run}"
            _push(folder, repo_id, publish, args.token)


def run_recycle(args) -> None:
    from .recipe import format_plans, plan_recipe, recycle
    from .recipe.executor import Worker

    config = options_from_args(args, RecipeConfig)
    output = Path(config.output)
    if args.dry_run:
        say(format_plans(plan_recipe(config, token=args.token), output))
        return
    results = recycle(config, token=args.token)
    if Worker.of_this_process().is_main:  # under accelerate launch: the tables print once
        _print_results(results, output, options_from_args(args, PublishOptions), args.token)


def run_plan(args) -> None:
    from .recipe import format_plans, plan_output

    config = options_from_args(args, RecipeConfig)
    output = Path(config.output)
    plans = plan_output(config, token=args.token)
    runs = sum(len(plan.runs) for plan in plans)
    say(format_plans(plans, output))
    say(
        f"\nsaved the plan of {runs} runs in {output / 'plan.json'}: train them with "
        f"`ratatouille-hub run {output} --index I` for I in 0..{runs - 1}, then `ratatouille-hub assemble {output}`"
    )


def run_run(args) -> None:
    from .recipe import run_index

    options = options_from_args(args, RunOptions)
    folder = run_index(Path(options.output), options.index, token=args.token)
    say(f"run {options.index}: {folder}")


def run_assemble(args) -> None:
    from .recipe import assemble_output

    options = options_from_args(args, AssembleOptions)
    output = Path(options.output)
    if options.from_hub:
        from .community import assemble_from_hub
        from .merging import check_merge_output

        check_merge_output(output, [])  # replaced whole: never a plan folder or anything else
        assemble_from_hub(options.from_hub, output, token=args.token)
        return
    _print_results(assemble_output(output, token=args.token), output, PublishOptions(), args.token)


def _print_results(results, output: Path, publish: PublishOptions, token) -> None:
    from .results import LeaveOneDomainOut, soup_subfolder
    from .safe_text import path_component, terminal_safe

    say("")
    if isinstance(results, LeaveOneDomainOut):
        say(results.format())
        say(f"\nsoups: {output / 'soups'}/<domain>; table: {output / 'results.json'}")
        for domain in results.per_domain:
            if publish.push_to_hub:
                _push(
                    output / soup_subfolder(domain), f"{publish.push_to_hub}-{path_component(domain)}", publish, token
                )
        return
    held_out = terminal_safe(results.test_domain)
    for row in results.summary:
        say(
            f"{terminal_safe(row.name):<48} val {100 * row.val_accuracy:5.1f}%   {held_out} {100 * row.test_accuracy:5.1f}%"
        )
    say(f"\n{'soup' if results.is_average else 'best run'}: {output / 'soup'}")
    _push_if_asked(publish, output / "soup", token)


def _push_if_asked(publish: PublishOptions, folder: Path, token) -> None:
    if publish.push_to_hub:
        _push(folder, publish.push_to_hub, publish, token)


def _push(folder: Path, repo_id: str, publish, token) -> None:
    from .publish import push_and_say

    push_and_say(folder, repo_id, publish, token)


def run_merge(args) -> None:
    from .merging import merge

    merge(options_from_args(args, MergeOptions), publish=options_from_args(args, PublishOptions), token=args.token)


def run_demo(args) -> None:
    import os

    from .localhub.server import LocalHub, hub_environment

    with LocalHub(args.output / "hub") as hub:
        log.info(f"[hub] local Hub stand-in at {hub.url} (store: {args.output / 'hub'})")
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, args.output / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        from .toy.demo import run_demo as demo

        with logs.library_output(verbosity_of(args)):
            demo(args.output, hub)


def run_discover(args) -> None:
    from .discover import discover_finetunes, format_candidates
    from .fetch import resolve_dataset, split_revision

    options = options_from_args(args, DiscoverOptions)
    target = split_revision(resolve_dataset(options.target)[0])[0] if options.target else None
    say(format_candidates(discover_finetunes(options.base, target=target, limit=options.limit, token=args.token)))


def run_diagnose(args) -> None:
    from .diagnose import diagnose_models, format_diagnosis, plot_paths

    options = options_from_args(args, DiagnoseOptions)
    diagnosis = diagnose_models(options.models, options, token=args.token)
    say(format_diagnosis(diagnosis))
    if options.plot:
        plot_paths(diagnosis, Path(options.plot))
        say(f"plot: {options.plot}")


def run_contribute(args) -> None:
    from .community import contribute_runs

    options = options_from_args(args, ContributeOptions)
    contribute_runs(Path(options.output), options.to, options.index or None, token=args.token)


def run_update(args) -> None:
    from .community import update_soup

    options = options_from_args(args, UpdateOptions)
    output = Path(options.output) if options.output else None
    if output is not None:
        from .merging import check_merge_output

        check_merge_output(output, [Path(m) for m in (options.soup, *options.add, *options.remove) if Path(m).is_dir()])
    evaluate = None
    if options.target:
        from .fetch import resolve_model
        from .models import load_classifier
        from .target import prepare_target
        from .train import validation_accuracy

        def evaluate(folder: Path) -> float:
            target = prepare_target(options, resolve_model(str(folder)), args.token)
            model = load_classifier(folder, target.id2label)
            return validation_accuracy(model, target.data.pooled_val, target.data.normalize)

    update_soup(
        options.soup, options.add, options.remove, output, token=args.token, evaluate=evaluate, dataset=options.target
    )


def run_push(args) -> None:
    options = options_from_args(args, PushOptions)
    _push(Path(options.folder), options.repo_id, options, args.token)


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
    output = Path(config.output)
    if args.index is not None:
        say(f"run {args.index}: {run_sweep_index(output, args.index, token=args.token)}")
    elif args.plan_only:
        say(format_sweep_plan(plan_sweep(config, token=args.token), output))
    else:
        table = collect(output, token=args.token) if args.assemble else sweep(config, token=args.token)
        if Worker.of_this_process().is_main:  # under accelerate launch: the table prints once
            say(f"\n{table.format()}\n\ntable: {output / 'results.json'}; cost: {output / 'cost.json'}")


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
    "push": run_push,
    "demo": run_demo,
    "local-hub": run_local_hub,
}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 with one `error:` line for bad input (a `RatatouilleError`, an I/O or Hub
    failure); 1 with the traceback and a request to report it for anything else, which is a bug."""
    from .allocator import tune_allocator
    from .safe_text import terminal_safe

    tune_allocator()  # before torch allocates anything: PyTorch on CPU is 2-5x slower without it
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose ask for opposite things: give one")
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
