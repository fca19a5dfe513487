# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The glibc allocator settings PyTorch needs on CPU are applied by the product at start-up
# (ratatouille_hub/allocator.py), so `make demo` and the console script run alike.

.PHONY: venv demo test format bench-merge bench-pacs clean

$(BIN)/ratatouille-hub: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(BIN)/ratatouille-hub

demo: venv
	$(BIN)/ratatouille-hub demo --output demo-output

test: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	# One worker per core (at most 4: each holds torch): the suite is bound by its commands' start-up (torch,
	# transformers and evaluate imports, about 10 s a process), which one process leaves on a single core.
	# A test file goes to one worker whole (loadfile): its module fixtures (a sweep, a reference recycle) are
	# built once, not once on each worker.
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

format: venv  # what `make test` checks, applied
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-merge: venv
	$(BIN)/python benchmarks/merge.py

bench-pacs: venv  # hours on 2 cores; resumable: rerun to continue
	$(BIN)/python benchmarks/pacs.py

clean:
	rm -rf $(VENV) demo-output demo-smoke
