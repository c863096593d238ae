# The two commands of the README: `make demo` and `make test`. Each creates .venv
# and installs what it needs on a fresh machine (Python 3.9+ with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeship-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@touch $@

## demo: the main job end to end on the embedded defaults (no broker, no device, no account)
demo: $(STAMP)
	$(BIN)/python examples/digits/run.py

## test: the whole suite, slow tests included (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-fast: the suite without the tests marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## bench: the benchmarks; results go to docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python benchmarks/conversion.py --write docs/benchmarks.md

lint: $(STAMP)
	$(BIN)/python -m ruff check converters ota toolkit device-agent tests
	$(BIN)/python -m mypy -p edgeship.ota -p edgeship.agent

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
