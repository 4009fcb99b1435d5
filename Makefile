# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sledagent demo

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" scripts/test

check: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" scripts/check

bench: $(STAMP)
	$(BIN)/sledagent bench mass-stop --policy both --vmms 200

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
