"""The `ratatouille-hub` command. Flags of `recycle` are generated from RecipeConfig's fields.

Heavy libraries (torch, transformers, evaluate) are imported inside the commands, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .config import AVERAGING_STRATEGIES, IntertrainConfig, RecipeConfig

EPILOG_RECYCLE = """\
examples:
  ratatouille-hub recycle --base ./base --target ./pacs --aux ./ft-a ./ft-b --test-domain sketch
  ratatouille-hub recycle --config out/recipe.yaml            # replay a saved recipe
  ratatouille-hub recycle --config out/recipe.yaml --runs 4   # ... with one option changed
Rerunning the same command resumes: finished runs are reused, never recomputed.
"""

EPILOG_INTERTRAIN = """\
examples:
  ratatouille-hub intertrain --base microsoft/resnet-50 --dataset ./caltech101 --runs 2 --steps 2000
  ratatouille-hub intertrain --base me/base --dataset someone/cars --push-to-hub me/base-cars
Rerunning the same command reuses finished fine-tunes.
"""


def _add_config_flags(parser: argparse.ArgumentParser, options: type = RecipeConfig) -> None:
    """One flag per field of the options dataclass; defaults are suppressed so --config values can be overlaid."""
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = f.metadata.get("help", "")
        if f.default not in ("", None, ()):
            help_text += f" (default: {f.default})"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is tuple:
            kwargs.update(nargs="+", type=args[0], metavar=f.name.upper().rstrip("S") if f.name == "aux" else "V")
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = args[0] if args else hint
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, help=help_text, **kwargs)


def _add_push_flags(
    parser: argparse.ArgumentParser, push_help: str = "push the result to this Hub repo (namespace/name) in one commit"
) -> None:
    group = parser.add_argument_group("publishing")
    group.add_argument("--push-to-hub", metavar="ID", help=push_help)
    group.add_argument("--private", action="store_true", help="create the repo private")
    group.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if missing; default main)")
    _add_token_flag(group)


def _add_token_flag(parser) -> None:
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login); never written anywhere")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratatouille-hub",
        description="Recycle fine-tunes of one base model into one weight-averaged model (Model Ratatouille).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recycle = commands.add_parser(
        "recycle",
        help="fine-tune recycled checkpoints on a target and average them",
        description="Run the Model Ratatouille recipe: shared linear probe, one fine-tune per run "
        "(each from the base or a recycled fine-tune), weight average, evaluation on the held-out "
        "domain, and a transformers model folder with its card in <output>/soup.",
        epilog=EPILOG_RECYCLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recycle.add_argument("--config", type=Path, help="recipe.yaml to start from; flags override its values")
    _add_config_flags(recycle)
    _add_push_flags(recycle)

    intertrain = commands.add_parser(
        "intertrain",
        help="fine-tune a base on an auxiliary dataset: checkpoints for recycle to recycle",
        description="Inter-training (METHOD.md step 2): fine-tune --base on every image of --dataset and keep "
        "the last-step weights, as a transformers folder with a card naming the base and the dataset "
        "(base_model_relation: finetune). Pushed to the Hub, these are what recycle discovers.",
        epilog=EPILOG_INTERTRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    intertrain.add_argument("--config", type=Path, help="recipe.yaml to start from; flags override its values")
    _add_config_flags(intertrain, IntertrainConfig)
    _add_push_flags(
        intertrain, "push each fine-tune to this Hub repo (namespace/name; with --runs N > 1: ID-0 ... ID-<N-1>)"
    )

    merge = commands.add_parser(
        "merge",
        help="average compatible checkpoints without training",
        description="Average transformers checkpoints tensor by tensor (streaming, float32 accumulation). "
        "All inputs must share names, shapes, dtypes and labels.",
    )
    merge.add_argument("models", nargs="+", type=Path, help="model folders holding model.safetensors")
    merge.add_argument("--output", type=Path, required=True, help="folder for the merged model")
    merge.add_argument(
        "--method",
        choices=("uniform", "greedy", "weighted"),
        default="uniform",
        help="uniform mean; greedy: add models by validation accuracy, keep one only if the "
        "average does not lose accuracy (needs --target); weighted by --weights (normalised)",
    )
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per model, with --method weighted")
    merge.add_argument(
        "--target", help="with --method greedy: dataset whose training-domain validation ranks and selects"
    )
    merge.add_argument("--test-domain", help="with --method greedy: held-out domain, never used (default: first)")
    merge.add_argument("--image-size", type=int, help="with --method greedy: resolution (default: the processor's)")
    _add_push_flags(merge)

    discover = commands.add_parser(
        "discover",
        help="list fine-tunes of a base on the Hub and whether they can be recycled",
        description="Find fine-tunes of --base on the Hub (tag base_model:finetune:<base>, most downloaded first) "
        "and vet each from its metadata and safetensors headers alone, before any weight is downloaded: "
        "same backbone tensors (names, shapes, dtypes), safetensors weights, no remote code, and no "
        "training on the target dataset (leakage).",
    )
    discover.add_argument("--base", required=True, help="base model Hub id")
    discover.add_argument(
        "--target", help="target dataset (Hub id or alias such as PACS): fine-tunes trained on it are refused"
    )
    discover.add_argument("--limit", type=int, default=20, help="how many fine-tunes to examine (default: 20)")
    _add_token_flag(discover)

    diagnose = commands.add_parser(
        "diagnose",
        help="measure accuracy, diversity and averageability of a set of runs",
        description="METHOD.md's three criteria on training-domain validation: each model's accuracy, the "
        "ratio-error of each pair (errors by one / errors by both: diversity), and accuracy along the "
        "straight weight path between them (the barrier: averageability). Models must classify the "
        "target's labels (e.g. out/runs/*/model).",
    )
    diagnose.add_argument("models", nargs="+", help="model folders or Hub ids")
    diagnose.add_argument("--target", required=True, help="target dataset (folder, parquet or Hub id)")
    diagnose.add_argument("--test-domain", help="held-out domain, excluded as in recycle (default: first)")
    diagnose.add_argument("--domain-column", default="domain", help="domain column (default: domain)")
    diagnose.add_argument("--label-column", default="label", help="label column (default: label)")
    diagnose.add_argument("--image-size", type=int, help="resolution (default: the first model's processor)")
    diagnose.add_argument("--seed", type=int, default=0, help="trial seed of the train/validation split (default: 0)")
    diagnose.add_argument("--plot", type=Path, help="write the interpolation paths as a PNG here")
    _add_token_flag(diagnose)

    push = commands.add_parser(
        "push",
        help="push a soup folder to the Hub in one commit",
        description="Push a soup folder (weights, config, processor, card, recipe.yaml, results.json) in one "
        "commit. The card is validated first; rerunning a finished push makes no new commit.",
    )
    push.add_argument("folder", type=Path, help="the soup folder (e.g. out/soup)")
    push.add_argument("repo_id", metavar="ID", help="namespace/name of the Hub repo")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing; default main)")
    _add_token_flag(push)

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
    return parser


def config_from_args(args: argparse.Namespace, options: type = RecipeConfig):
    values = options.load_yaml(args.config).to_dict() if args.config else {}
    names = {f.name for f in dataclasses.fields(options)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return options.from_dict(values)


def run_intertrain(args) -> None:
    from .intertrain import intertrain

    config = config_from_args(args, IntertrainConfig)
    folders = intertrain(config, token=args.token)
    for run, folder in enumerate(folders):
        print(f"fine-tune {run}: {folder}")
        if args.push_to_hub:
            _push(folder, args.push_to_hub if len(folders) == 1 else f"{args.push_to_hub}-{run}", args)


def run_recycle(args) -> None:
    from .recipe import recycle

    config = config_from_args(args)
    results = recycle(config, token=args.token)
    print()
    for row in results["summary"]:
        print(
            f"{row['name']:<48} val {100 * row['val_accuracy']:5.1f}%   {results['test_domain']} {100 * row['test_accuracy']:5.1f}%"
        )
    print(f"\n{'soup' if config.strategy in AVERAGING_STRATEGIES else 'best run'}: {Path(config.output) / 'soup'}")
    _push_if_asked(args, Path(config.output) / "soup")


def _push_if_asked(args, folder: Path) -> None:
    if args.push_to_hub:
        _push(folder, args.push_to_hub, args)


def _push(folder: Path, repo_id: str, args) -> None:
    from .publish import push_folder

    result = push_folder(folder, repo_id, private=args.private, revision=args.revision, token=args.token)
    if result.changed:
        print(f"pushed {folder} to {result.url}")
    else:
        print(f"no changes: {repo_id}@{result.oid[:8]} already has these files")


# What a previous `merge` writes: an output holding only these may be replaced by a new merge.
MERGE_OUTPUT_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json")


def check_merge_output(output: Path, inputs: list[Path]) -> None:
    """The output is replaced whole, so it must be new, empty or an earlier merge; never an input."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")
    resolved = output.resolve()
    for model in inputs:
        if resolved == model.resolve() or resolved in model.resolve().parents:
            raise ValueError(f"output {output} is (or contains) the input {model}; choose another folder")
    if output.is_dir():
        foreign = sorted(
            p.name for p in output.iterdir() if not p.name.startswith("model-") and p.name not in MERGE_OUTPUT_FILES
        )
        if foreign:
            raise ValueError(
                f"output {output} holds other files ({', '.join(foreign[:3])}); it would be replaced whole - choose an empty folder"
            )


def run_merge(args) -> None:
    from .io import staged_folder
    from .merge import merge_model_folders, normalize_weights

    if args.method == "weighted" and not args.weights:
        raise ValueError("--method weighted needs --weights, one per model")
    if args.method == "uniform" and args.weights:
        raise ValueError("--weights goes with --method weighted")
    if (args.method == "greedy") != bool(args.target):
        raise ValueError("--method greedy needs --target (and --target goes only with greedy)")
    weights = normalize_weights(args.weights, len(args.models)) if args.weights else None
    check_merge_output(args.output, args.models)
    models = args.models
    if args.method == "greedy":
        from .recipe import greedy_members

        config = RecipeConfig(
            base=str(models[0]), target=args.target, test_domain=args.test_domain, image_size=args.image_size
        )
        chosen = greedy_members(models, config, token=args.token)
        print(f"greedy kept {len(chosen)} of {len(models)}: {', '.join(str(models[i]) for i in chosen)}")
        models = [models[i] for i in chosen]
    with staged_folder(args.output) as staging:
        merge_model_folders(models, staging, weights=weights)
    print(f"merged {len(models)} models into {args.output}")
    _push_if_asked(args, args.output)


def run_demo(args) -> None:
    import os

    from .localhub.server import LocalHub, hub_environment

    with LocalHub(args.output / "hub") as hub:
        print(f"[hub] local Hub stand-in at {hub.url} (store: {args.output / 'hub'})")
        # Before any HF library is imported: they read these once, at import time.
        os.environ.update(hub_environment(hub.url, args.output / "hf-home"))
        os.environ.pop("HF_TOKEN", None)
        from .toy.demo import run_demo as demo

        demo(args.output, hub)


def run_discover(args) -> None:
    from .discover import discover_finetunes, format_candidates
    from .fetch import resolve_dataset

    target = resolve_dataset(args.target)[0] if args.target else None
    print(format_candidates(discover_finetunes(args.base, target=target, limit=args.limit, token=args.token)))


def run_diagnose(args) -> None:
    from .diagnose import diagnose_models, format_diagnosis, plot_paths

    config = RecipeConfig(
        base=args.models[0],
        target=args.target,
        test_domain=args.test_domain,
        domain_column=args.domain_column,
        label_column=args.label_column,
        image_size=args.image_size,
        seed=args.seed,
    )
    diagnosis = diagnose_models(args.models, config, token=args.token)
    print(format_diagnosis(diagnosis))
    if args.plot:
        plot_paths(diagnosis, args.plot)
        print(f"plot: {args.plot}")


def run_push(args) -> None:
    _push(args.folder, args.repo_id, args)


def run_local_hub(args) -> None:
    from .localhub.server import serve

    serve(args.root, args.port, token=args.require_token)


COMMANDS = {
    "recycle": run_recycle,
    "intertrain": run_intertrain,
    "merge": run_merge,
    "discover": run_discover,
    "diagnose": run_diagnose,
    "push": run_push,
    "demo": run_demo,
    "local-hub": run_local_hub,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug or not _is_user_facing(error):
            raise
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 2
    return 0


def _is_user_facing(error: Exception) -> bool:
    """Our errors (ValueError subclasses), I/O errors that name their file, and network failures."""
    if isinstance(error, (ValueError, OSError)):
        return True
    return type(error).__module__.split(".")[0] in ("httpx2", "httpx", "huggingface_hub")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
