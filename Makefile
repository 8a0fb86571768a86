# The two commands of README's quick start, plus helpers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# TensorRT 10 type stubs, kept out of site-packages: an importable empty `tensorrt` package there
# would make ModelOpt believe TensorRT is installed. Tests check Kiln's TensorRT API names against it.
TRT_STUBS := $(VENV)/trt-stubs
CORES ?= all

.PHONY: run test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 (an unpinned torch pulls the CUDA build).
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps --target $(TRT_STUBS) tensorrt-stubs
	touch $(STAMP)

run: $(STAMP)  ## run the pipeline on config.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config.yaml --rerun-incomplete --show-failed-logs
	@echo; echo "Summary: $$(pwd)/results/report/summary.md"; echo; cat results/report/summary.md

test: $(STAMP)  ## run the test suite
	KILN_TRT_STUBS=$(TRT_STUBS) $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check kiln tests scripts
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
