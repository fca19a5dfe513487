"""Every journey the README shows is a test: each `ratatouille-hub` command block of README.md runs end to end,
in order, as a user types it (the rules are in tests/journeys.py), through the real CLI on tiny models over
the session's local Hub; and the how-to-reproduce commands of the cards the commands write run too.
A README command that no journey runs fails `test_every_readme_command_is_run_by_a_journey`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import journeys
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file

from ratatouille_hub import cli
from ratatouille_hub.merge_engine import read_safetensors_metadata
from ratatouille_hub.provenance import INGREDIENTS_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CARD_COMMANDS = {  # what each kind of card tells its reader to type; the card journey types each
    "recycled soup": "ratatouille-hub recycle --config recipe.yaml",
    "contributed run": "ratatouille-hub assemble SOUP --from-hub <this repo>",
    "grown soup": "ratatouille-hub update SOUP --add RUN",
    "merged model": "ratatouille-hub merge --config merge.yaml",  # typed in tests/test_merge_command.py
}


@pytest.fixture(scope="module")
def world(local_hub, new_hub_namespace, tiny_world, tiny_checkpoints, tmp_path_factory) -> journeys.World:
    return journeys.build_world(local_hub, new_hub_namespace(), tiny_world, tiny_checkpoints, tmp_path_factory)


class Terminal:
    """A user's shell in a fresh working folder holding the world's local folders: runs the CLI in-process."""

    def __init__(self, world, folder: Path, start_from: Path | None = None, budget=journeys.BUDGET):
        """A copy of `start_from` (default: the world's local folders) at `folder`, unless it exists."""
        if not folder.exists():
            shutil.copytree(start_from or world.disk, folder)
        self.folder = folder
        self.shell = journeys.Shell(world.ns, folder, self.run, port=_free_port(), budget=budget)

    def run(self, argv: list[str], environment: dict[str, str] | None = None) -> str:
        if argv[0] == "local-hub":
            return serve_briefly(argv, self.folder)
        if environment:  # read at import by the HF clients: a fresh process, as the user's shell starts one
            done = subprocess.run(
                [sys.executable, "-m", "ratatouille_hub", *argv],
                cwd=self.folder,
                capture_output=True,
                text=True,
                timeout=600,
                # one thread, as the in-process commands run (one_torch_thread): the same kernels, the same bytes
                env={**os.environ, "PYTHONPATH": str(journeys.ROOT), "OMP_NUM_THREADS": "1", **environment},
            )
            assert done.returncode == 0, f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
            return done.stdout
        cwd, printed = os.getcwd(), io.StringIO()
        os.chdir(self.folder)
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                code = cli.main(argv)
        finally:
            os.chdir(cwd)
        output = printed.getvalue()
        assert code == 0, f"`{' '.join(argv)}` exited {code}:\n{output}"
        return output

    def block(self, section: str, before: dict | None = None) -> list[str]:
        """Types every line of the README block under `section`; `before[line]` is typed just before `line`."""
        (block,) = [b for b in journeys.readme_blocks() if b.section == section]
        outputs = []
        for line in block.lines:
            if journeys.by_reference(line):
                continue
            for earlier in (before or {}).get(line, ()):
                self.shell.type(earlier)
            outputs += self.shell.type(line)
        return outputs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_briefly(argv: list[str], folder: Path) -> str:
    """`local-hub` serves until stopped: start it, see it answer the Hub API, stop it."""
    port = argv[argv.index("--port") + 1]
    server = subprocess.Popen(
        [sys.executable, "-m", "ratatouille_hub", *argv],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(journeys.ROOT)},
    )
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models") as answer:
                    assert json.loads(answer.read()) == []
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                time.sleep(0.1)
        else:
            raise AssertionError("local-hub never answered")
    finally:
        server.terminate()
    return server.communicate(timeout=30)[0]


def same_tensors(a: Path, b: Path) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_readme_command_is_run_by_a_journey():
    assert journeys.unrun_commands(journeys.README.read_text()) == []
    assert all((journeys.ROOT / test).exists() for test in journeys.BY_REFERENCE.values())
    assert sorted(journeys.card_source_commands()) == sorted(CARD_COMMANDS.values())


def test_a_command_no_journey_runs_is_found():
    extra = "\n## Something new\n\n```bash\nratatouille-hub merge a b --output c  # new\n```\n"
    assert journeys.unrun_commands(journeys.README.read_text() + extra) == ["ratatouille-hub merge a b --output c"]
    foreign = journeys.README.read_text().replace("ratatouille-hub assemble out\n", "python -m foo out\n")
    assert journeys.unrun_commands(foreign) == ["python -m foo out"]


def test_quickstart(world, tmp_path):
    ns = world.ns
    terminal = Terminal(world, tmp_path / "quickstart")
    outputs = terminal.block("Quickstart")
    assert f"{ns}-community/finetune-1" in outputs[0] and f"{ns}-community/finetune-2" in outputs[0]
    soup, first_push = terminal.folder / "out" / "soup", terminal.folder / "ratatouille-output" / "soup"
    assert same_tensors(Path(snapshot_download(f"{ns}-me/pacs-soup")) / "model.safetensors", soup / "model.safetensors")
    assert not same_tensors(first_push / "model.safetensors", soup / "model.safetensors")
    assert (
        "no changes" in terminal.shell.type(_line("ratatouille-hub push me/pacs-soup out/soup"))[0]
    )  # the rerun the line promises
    assert HfApi().model_info(f"{ns}-me/base-caltech101").card_data.base_model == f"{ns}-org/base"
    assert (terminal.folder / "paths.png").stat().st_size > 0
    runs = journeys.BUDGET_RUNS
    assert len(list((terminal.folder / "out" / "runs").glob("*/done"))) == runs + runs - 1  # soup's run 0 is shared


def test_scaling_out(world, tmp_path):
    terminal = Terminal(world, tmp_path / "scaling")
    outputs = terminal.block("Scaling out")
    assert f"saved the plan of {journeys.BUDGET_RUNS} runs" in outputs[0]
    out = terminal.folder / "out"
    assert (out / "soup" / "model.safetensors").exists()
    soups = sorted(p.parent.name for p in (out.parent / "out-all" / "soups").glob("*/model.safetensors"))
    assert soups == ["cartoon", "painting", "photo", "sketch"]


def test_sweeps(world, tmp_path):
    terminal = Terminal(world, tmp_path / "sweeps")
    outputs = terminal.block("Sweeps: trials x strategies x held-out domains")
    swept, spread = terminal.folder / "sweep", terminal.folder / "sweep-spread"
    saved = yaml.safe_load((spread / "sweep.yaml").read_text())  # what `--config sweep.yaml` replays: pinned
    base = f"{world.ns}-org/base"
    assert saved["base"] == f"{base}@{world.shas[base]}" and saved["discovered"] and "@" in saved["target"]
    assert (swept / "results.json").read_bytes() == (spread / "results.json").read_bytes()
    table = json.loads((swept / "results.json").read_text())
    assert "erm" in outputs[0] and "ratatouille" in outputs[0] and table  # printed and written
    tasks = [output for output in outputs if re.search(r"^run \d+: ", output, re.M)]
    assert len(tasks) == len(list(spread.glob("trial-*/runs/*/done"))) > 0  # one array task per distinct run


@pytest.fixture(scope="module")
def sketch_recipe(world, tmp_path_factory):
    """What the Hub journeys presume: a finished PACS recipe in out/, held out on sketch (the Quickstart's Hub
    recycle, with --output out)."""
    folder = tmp_path_factory.mktemp("sketch") / "work"
    terminal = Terminal(world, folder)
    terminal.shell.type("ratatouille-hub recycle --base org/base --target PACS --test-domain sketch --output out")
    return folder


def test_replay_and_offline_use(world, sketch_recipe, tmp_path):
    """The Quickstart's Hub recipe replayed elsewhere, rediscovered in place and replayed offline: one soup."""
    terminal = Terminal(world, tmp_path / "replay", start_from=sketch_recipe)
    terminal.block("Replay and offline use")
    soups = [terminal.folder / name / "soup" / "model.safetensors" for name in ("out", "replayed", "offline")]
    assert [same_tensors(soups[0], soup) for soup in soups[1:]] == [True, True]
    recipe = yaml.safe_load((terminal.folder / "out" / "recipe.yaml").read_text())
    assert recipe["base"] == f"{world.ns}-org/base@{world.shas[f'{world.ns}-org/base']}"
    community = {f"{world.ns}-community/finetune-{k}" for k in (1, 2)}
    assert {f"{c}@{world.shas[c]}" for c in community} <= set(recipe["discovered"])  # pinned (and any pushed since)
    replayed = yaml.safe_load((terminal.folder / "replayed" / "recipe.yaml").read_text())
    assert replayed["discovered"] == recipe["discovered"]  # nothing new: rediscovering found the same


def test_soups_that_grow_on_the_hub(world, sketch_recipe, tmp_path):
    """The block as written; meanwhile bob contributes runs 2 and 3 of the same recipe, as alice did 0 and 1."""
    ns = world.ns
    terminal = Terminal(world, tmp_path / "grow", start_from=sketch_recipe)
    folder = terminal.folder
    bob = "ratatouille-hub contribute out --to bob/pacs-sketch --index 2 3"
    terminal.block("Soups that grow on the Hub", before={_line("--add bob/pacs-sketch-run2"): [bob]})
    api = HfApi()
    assert api.model_info(f"{ns}-alice/pacs-sketch-run1").card_data.datasets == [f"{ns}-data/pacs"]
    card = ModelCard.load(f"{ns}-me/pacs-soup")
    assert "4 runs of one recipe" in card.text and card.data.eval_results[0].metric_name.startswith("training")
    smaller = read_safetensors_metadata(folder / "smaller-soup" / "model.safetensors")
    assert len(json.loads(smaller[INGREDIENTS_KEY])) == journeys.BUDGET_RUNS - 1
    merged = ModelCard.load(f"{ns}-me/pacs-merged")  # the mergekit-style line: pushed with its card
    assert merged.data.base_model_relation == "merge" and merged.data.base_model
    assert set(merged.data.base_model) <= {f"{ns}-alice/pacs-sketch-run{k}" for k in (0, 1)}
    assert merged.data.eval_results[0].metric_name == "training-domain validation accuracy"
    saved = yaml.safe_load((folder / "merged" / "merge.yaml").read_text())
    assert all(re.fullmatch(rf"{ns}-alice/pacs-sketch-run[01]@[0-9a-f]{{40}}", model) for model in saved["models"])
    replayed = (folder / name / "model.safetensors" for name in ("merged", "merged-again"))
    assert next(replayed).read_bytes() == next(replayed).read_bytes()


def _line(fragment: str) -> str:
    """The one README line holding `fragment`, or the one that is exactly it."""
    lines = [line for b in journeys.readme_blocks() for line in b.lines if fragment in line]
    (line,) = [line for line in lines if line == fragment] or lines
    return line


def card_command(repo_id: str, kind: str) -> str:
    """The one command the card of `repo_id` shows, which must be that kind of card's."""
    assert journeys.card_commands(ModelCard.load(repo_id).text) == [CARD_COMMANDS[kind]]
    return CARD_COMMANDS[kind]


def test_the_cards_how_to_reproduce_commands(world, tmp_path):
    """Each card a command writes (a recycled soup, a contributed run, a grown soup) names the command that
    reproduces or grows it; typed from the card, each does what the card says."""
    ns = world.ns
    terminal = Terminal(world, tmp_path / "cards")
    for line in (
        "ratatouille-hub recycle --base org/base --target PACS --test-domain cartoon --output out",
        "ratatouille-hub push me/cartoon-soup out/soup",
        "ratatouille-hub contribute out --to me/pacs-cartoon --index 0 1 2",
    ):
        terminal.shell.type(line)
    soup_repo, runs = f"{ns}-me/cartoon-soup", f"{ns}-me/pacs-cartoon"

    # the recycled soup's card: its recipe, downloaded beside it, replays to the same weights
    downloaded = Path(snapshot_download(soup_repo, local_dir=tmp_path / "downloaded"))
    replay = card_command(soup_repo, "recycled soup")
    Terminal(world, downloaded, budget={}).shell.type(replay)
    assert same_tensors(downloaded / "out" / "soup" / "model.safetensors", downloaded / "model.safetensors")

    # a contributed run's card: assembles the soup of its recipe's runs from the Hub
    assemble = card_command(f"{runs}-run0", "contributed run")
    terminal.shell.type(journeys.fill(assemble, {"SOUP": "grown", "<this repo>": f"{runs}-run0"}))
    merged = load_file(terminal.folder / "grown" / "model.safetensors")
    terminal.shell.type("ratatouille-hub push me/cartoon-grown grown")

    # the grown soup's card: a run added exactly
    terminal.shell.type("ratatouille-hub contribute out --to me/pacs-cartoon --index 3")
    update = card_command(f"{ns}-me/cartoon-grown", "grown soup")
    terminal.shell.type(journeys.fill(update, {"SOUP": f"{ns}-me/cartoon-grown", "RUN": f"{runs}-run3"}))
    assert "4 runs of one recipe" in ModelCard.load(f"{ns}-me/cartoon-grown").text
    grown = load_file(snapshot_download(f"{ns}-me/cartoon-grown") + "/model.safetensors")
    assert grown.keys() == merged.keys() and not all(torch.equal(grown[k], merged[k]) for k in grown)


def test_pinned_references_as_the_quickstart_describes(world, tmp_path):
    """`--base id@rev`, `--target id@rev` and `--aux id@rev` (the Quickstart's prose): the Hub recycle with every
    reference pinned to the commit the Hub holds gives the soup of the same command unpinned."""
    ns, base, pacs = world.ns, f"{world.ns}-org/base", f"{world.ns}-data/pacs"
    aux = [f"{ns}-community/finetune-{k}" for k in (1, 2)]
    terminal = Terminal(world, tmp_path / "pinned")
    for output, pin in (("unpinned", lambda repo: repo), ("pinned", lambda repo: f"{repo}@{world.shas[repo]}")):
        terminal.shell.type(
            f"ratatouille-hub recycle --base {pin(base)} --target {pin(pacs)} --aux {' '.join(map(pin, aux))} "
            f"--test-domain sketch --output {output}"
        )
    folder = terminal.folder
    assert same_tensors(
        folder / "pinned" / "soup" / "model.safetensors", folder / "unpinned" / "soup" / "model.safetensors"
    )
    results = json.loads((folder / "pinned" / "soup" / "results.json").read_text())
    assert {i["source"]: i["revision"] for i in results["ingredients"]} == {r: world.shas[r] for r in (base, *aux)}
    assert results["target"] == f"{pacs}@{world.shas[pacs]}"
