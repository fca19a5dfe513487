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

from .config import RecipeConfig

EPILOG_RECYCLE = """\
examples:
  ratatouille-hub recycle --base ./base --target ./pacs --aux ./ft-a ./ft-b --test-domain sketch
  ratatouille-hub recycle --config out/recipe.yaml            # replay a saved recipe
  ratatouille-hub recycle --config out/recipe.yaml --runs 4   # ... with one option changed
Rerunning the same command resumes: finished runs are reused, never recomputed.
"""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RecipeConfig field; defaults are suppressed so --config values can be overlaid."""
    hints = typing.get_type_hints(RecipeConfig)
    for f in dataclasses.fields(RecipeConfig):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratatouille-hub",
        description="Recycle fine-tunes of one base model into one weight-averaged model (Model Ratatouille).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recycle = commands.add_parser(
        "recycle", help="fine-tune recycled checkpoints on a target and average them",
        description="Run the Model Ratatouille recipe: shared linear probe, one fine-tune per run "
        "(each from the base or a recycled fine-tune), weight average, evaluation on the held-out "
        "domain, and a transformers model folder with its card in <output>/soup.",
        epilog=EPILOG_RECYCLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recycle.add_argument("--config", type=Path, help="recipe.yaml to start from; flags override its values")
    _add_config_flags(recycle)

    merge = commands.add_parser(
        "merge", help="average compatible checkpoints without training",
        description="Average transformers checkpoints tensor by tensor (streaming, float32 accumulation). "
        "All inputs must share names, shapes, dtypes and labels.",
    )
    merge.add_argument("models", nargs="+", type=Path, help="model folders holding model.safetensors")
    merge.add_argument("--output", type=Path, required=True, help="folder for the merged model")
    merge.add_argument("--method", choices=("uniform", "weighted"), default="uniform",
                       help="uniform mean, or weighted by --weights (normalised to sum to 1)")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per model, with --method weighted")

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on a built-in toy world (offline, about 2 minutes)",
        description="Build a tiny world (a base, three community fine-tunes, a 4-domain target), then "
        "compare ERM, model soups and Model Ratatouille on the held-out domain.",
    )
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="folder for everything (default: demo-output)")

    hub = commands.add_parser(
        "local-hub", help="serve a local Hub-compatible registry (tests, offline work)",
        description="A local stand-in for the Hugging Face Hub on 127.0.0.1, backed by a folder. Point the "
        "clients at it with HF_ENDPOINT=http://127.0.0.1:PORT and HF_HUB_DISABLE_XET=1. Not a production registry.",
    )
    hub.add_argument("--root", type=Path, required=True, help="folder that stores the repos")
    hub.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    hub.add_argument("--require-token", metavar="TOKEN", help="refuse writes without this bearer token")
    return parser


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    values = RecipeConfig.load_yaml(args.config).to_dict() if args.config else {}
    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return RecipeConfig.from_dict(values)


def run_recycle(args) -> None:
    from .recipe import recycle

    config = config_from_args(args)
    results = recycle(config)
    print()
    for row in results["summary"]:
        print(f"{row['name']:<48} val {100 * row['val_accuracy']:5.1f}%   {results['test_domain']} {100 * row['test_accuracy']:5.1f}%")
    print(f"\nsoup: {Path(config.output) / 'soup'}")


def run_merge(args) -> None:
    from .io import staged_folder
    from .merge import merge_model_folders, normalize_weights

    if args.method == "weighted" and not args.weights:
        raise ValueError("--method weighted needs --weights, one per model")
    if args.method == "uniform" and args.weights:
        raise ValueError("--weights goes with --method weighted")
    weights = normalize_weights(args.weights, len(args.models)) if args.weights else None
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"output {args.output} exists and is not a folder")
    with staged_folder(args.output) as staging:
        merge_model_folders(args.models, staging, weights=weights)
    print(f"merged {len(args.models)} models into {args.output}")


def run_demo(args) -> None:
    from .demo import run_demo as demo

    demo(args.output)


def run_local_hub(args) -> None:
    from .hub_server import serve

    serve(args.root, args.port, token=args.require_token)


COMMANDS = {"recycle": run_recycle, "merge": run_merge, "demo": run_demo, "local-hub": run_local_hub}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # our errors subclass ValueError; I/O errors name the file
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
