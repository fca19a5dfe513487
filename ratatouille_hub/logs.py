"""Where messages go (docs/logging.md). A command's results (its tables, the summary it ends with) are written
to stdout by `safe_text.say`; everything said on the way (progress, stage lines, warnings) goes through the
`ratatouille_hub` logger, one child per module (`logging.getLogger(__name__)`), to stderr. The libraries'
own bars and log lines (transformers, huggingface_hub, datasets) are silenced for a command through their
own switches, and shown again with -v."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

from .safe_text import terminal_safe

LOGGER = "ratatouille_hub"
QUIET, DEFAULT, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG  # -q, no flag, -v


class TerminalHandler(logging.StreamHandler):
    """Each line of a message as it was written (no level or logger name: the lines users and tests read),
    escaped, since lines name datasets, repos and folders that others chose; to whatever `sys.stderr` is when
    the line is logged (pytest and redirect_stderr swap it; logging's own `_StderrHandler` does this, but is
    private)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(EscapingFormatter())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one: the property always reads sys.stderr
        pass


class EscapingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(terminal_safe(line) for line in super().format(record).split("\n"))


def install() -> None:
    """The terminal handler on the product's logger, once per process, at INFO: the Python API says its
    progress as the command does. It does not propagate, so an application's root handlers do not print
    every line twice; add your own handler to `logging.getLogger("ratatouille_hub")` to take them elsewhere."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(handler, TerminalHandler) for handler in logger.handlers):
        logger.addHandler(TerminalHandler())
        logger.setLevel(DEFAULT)
        logger.propagate = False


def bar_disable() -> bool | None:
    """tqdm's `disable` for the product's own progress bars: hidden under -q, else shown on a terminal only."""
    return None if logging.getLogger(LOGGER).isEnabledFor(DEFAULT) else True


@contextmanager
def verbosity(level: int, *, libraries: bool = True) -> Iterator[None]:
    """For one command: the product's messages from `level` on, and (with `libraries`) the libraries' own
    output as `library_output` sets it; everything as it was afterwards (tests run many commands in one
    process)."""
    logger = logging.getLogger(LOGGER)
    before = logger.level
    logger.setLevel(level)
    try:
        with library_output(level) if libraries else nullcontext():
            yield
    finally:
        logger.setLevel(before)


@contextmanager
def library_output(level: int) -> Iterator[None]:
    """transformers', huggingface_hub's and datasets' bars hidden and their log lines below errors, unless
    `level` is VERBOSE (-v): they are not this command's progress. A library is switched once it is imported:
    now if it already is, else right after the command first imports it, so a command that never imports
    transformers or datasets does not pay their import (1.3 s of a merge). A command that must set their
    environment variables first (demo) enters this after it has."""
    switches = {"huggingface_hub": _huggingface_hub, "transformers": _transformers, "datasets": _datasets}
    hub_bars_before = []  # huggingface_hub's bars before this command: where transformers' start when imported
    with ExitStack() as restore:

        def switch(library: str) -> None:
            if library == "huggingface_hub":
                from huggingface_hub.utils import are_progress_bars_disabled

                hub_bars_before.append(not are_progress_bars_disabled())
            # transformers imported now took its bars' state from huggingface_hub's, already switched: put
            # them back as an import outside the command would have left them
            shown = hub_bars_before[0] if library == "transformers" and library in waiting else None
            restore.callback(switches[library](show=level <= VERBOSE, shown=shown))

        # huggingface_hub's first: transformers' own switch flips huggingface_hub's too (transformers imports
        # it first), and the restores run in reverse, so huggingface_hub's state is put back last
        waiting = [library for library in switches if library not in sys.modules]
        for library in switches:
            if library not in waiting:
                switch(library)
        if waiting:
            restore.enter_context(_after_import(waiting, switch))
        yield


@contextmanager
def _after_import(names: list[str], then: Callable[[str], None]) -> Iterator[None]:
    """Call `then(name)` right after module `name` is first imported, while the block runs (an entry on
    sys.meta_path that wraps the found loader's exec_module; Python has no post-import hook of its own)."""
    finder = _PostImportFinder(set(names), then)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str], then: Callable[[str], None]):
        self.names, self.then = names, then

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)  # once; and the lookup below does not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            self.then(fullname)

        spec.loader.exec_module = exec_module
        return spec


def user_decides(variable: str) -> bool:
    """Whether the user set a library's own switch (`HF_HUB_DISABLE_PROGRESS_BARS=0` or `=1`, `..._VERBOSITY`):
    it wins, as the libraries themselves make it win over code (they warn when code tries otherwise)."""
    return os.environ.get(variable, "") != ""


def _switched(
    verbosity, bars, *, show: bool, verbosity_variable: str, bars_variable: str, shown: bool | None = None
) -> Callable[[], None]:
    """Set one library's log level (its warnings at -v, else its errors only) and its bars (shown at -v only),
    each unless the user's variable decides it; returns what puts both back (the bars to `shown` if given,
    else to their state now). `verbosity` is the library's (get_verbosity, set_verbosity), `bars` its
    (is_enabled, enable, disable)."""
    get_level, set_level = verbosity
    enabled, enable, disable = bars
    level, shown = get_level(), enabled() if shown is None else shown
    if not user_decides(verbosity_variable):
        set_level(logging.WARNING if show else logging.ERROR)
    if not user_decides(bars_variable):
        enable() if show else disable()

    def restore() -> None:
        set_level(level)
        if not user_decides(bars_variable):
            enable() if shown else disable()

    return restore


def _huggingface_hub(*, show: bool, shown: bool | None = None) -> Callable[[], None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    return _switched(
        (hub_logging.get_verbosity, hub_logging.set_verbosity),
        (lambda: not are_progress_bars_disabled(), enable_progress_bars, disable_progress_bars),
        show=show,
        shown=shown,
        verbosity_variable="HF_HUB_VERBOSITY",
        bars_variable="HF_HUB_DISABLE_PROGRESS_BARS",
    )


def _transformers(*, show: bool, shown: bool | None = None) -> Callable[[], None]:
    from transformers.utils import logging as hf_logging

    return _switched(
        (hf_logging.get_verbosity, hf_logging.set_verbosity),
        (hf_logging.is_progress_bar_enabled, hf_logging.enable_progress_bar, hf_logging.disable_progress_bar),
        show=show,
        shown=shown,
        verbosity_variable="TRANSFORMERS_VERBOSITY",
        bars_variable="HF_HUB_DISABLE_PROGRESS_BARS",  # transformers' bars follow huggingface_hub's variable
    )


def _datasets(*, show: bool, shown: bool | None = None) -> Callable[[], None]:
    import datasets

    return _switched(
        (datasets.logging.get_verbosity, datasets.logging.set_verbosity),
        (datasets.is_progress_bar_enabled, datasets.enable_progress_bars, datasets.disable_progress_bars),
        show=show,
        shown=shown,
        verbosity_variable="DATASETS_VERBOSITY",
        bars_variable="HF_DATASETS_DISABLE_PROGRESS_BARS",
    )
