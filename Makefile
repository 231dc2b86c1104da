# `make test` and `make reproduce` set up .venv themselves (pinned), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# GPU=cuda12 (`make setup GPU=cuda12`, or with test/reproduce) adds jax's CUDA plugin, pinned to jax's
# version; PyPI's torch==2.13.0 for Linux is a CUDA build already.
GPU    ?=
STAMP  := $(VENV)/.installed$(GPU:%=-%)

.PHONY: test reproduce setup clean

setup: $(STAMP)

# torch==2.13.0 goes in first, so that the rest resolves against it and no requirement swaps in another build.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==24.3.1
	$(BIN)/pip install --quiet torch==2.13.0 -c requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	$(if $(GPU),$(BIN)/pip install --quiet "jax[$(GPU)]==0.10.2" -c requirements.lock)
	touch $@

# Two pytest-xdist workers cut the suite's wall time by a third on 2 cores (one process keeps 1.2 cores
# busy: compiles and subprocess waits are serial); `make test TEST_WORKERS=auto` uses every core.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal

reproduce: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores all

clean:
	rm -rf $(VENV) .snakemake .pytest_cache .cache
