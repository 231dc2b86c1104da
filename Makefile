# `make test` and `make reproduce` set up .venv themselves (pinned), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-gpu reproduce setup clean

setup: $(STAMP)

# torch==2.13.0 is pinned first so that no other package pulls a CUDA build of torch.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==24.3.1
	$(BIN)/pip install --quiet torch==2.13.0 -c requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

reproduce: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores all

clean:
	rm -rf $(VENV) .snakemake .pytest_cache
