# The two commands of README's quick start, plus helpers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# TensorRT 10 type stubs, kept out of site-packages: an importable empty `tensorrt` package there
# would make ModelOpt believe TensorRT is installed. Tests check Kiln's TensorRT API names against it.
TRT_STUBS := $(VENV)/trt-stubs
TRITON := $(VENV)/triton
CORES ?= all
# Every package of the dev/CI environment at an exact version (kiln/envlock.py); `make relock` rewrites it.
LOCK := requirements.lock
RELOCK_VENV := .venv-relock
# Source `ultralytics` (docs/models.md) and its tests, on a CPU host: ultralytics and torchvision without their
# requirements (they would pull opencv-python, which needs libGL, and let pip pick another torch), then what
# Ultralytics imports (ultralytics and torchvision are pinned in constraints.txt; the others are its usual requirements).
ULTRALYTICS_NODEPS := ultralytics torchvision
ULTRALYTICS_DEPS := opencv-python-headless polars psutil requests ultralytics-thop ultralytics-platform

.PHONY: run test lint clean verify lock relock

# The install path: exactly the lock's pins, nothing resolved (--no-deps), then Kiln itself (editable).
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(TRT_STUBS) $$(sed -n 's/^#@target //p' $(LOCK))
	# A real tritonserver (CPU, Python backend) and tritonclient, pinned, beside the venv: tests/test_serve.py.
	bash scripts/install_triton.sh $(TRITON) $(BIN)/python > /dev/null \
		|| echo "kiln: tritonserver not installed: tests/test_serve.py skips the real server, saying why"
	touch $(STAMP)

# Resolve afresh from pyproject.toml (test extra) and constraints.txt in a scratch venv, then pin what got installed.
relock:  ## rewrite requirements.lock on purpose (newer releases within pyproject's ranges)
	rm -rf $(RELOCK_VENV)
	$(PYTHON) -m venv $(RELOCK_VENV)
	$(RELOCK_VENV)/bin/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 (an unpinned torch pulls the CUDA build).
	$(RELOCK_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(RELOCK_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test]'
	$(RELOCK_VENV)/bin/python -m pip install -q -c constraints.txt --no-deps $(ULTRALYTICS_NODEPS)
	$(RELOCK_VENV)/bin/python -m pip install -q -c constraints.txt $(ULTRALYTICS_DEPS)
	$(RELOCK_VENV)/bin/python -m pip install -q --no-deps --target $(RELOCK_VENV)/trt-stubs tensorrt-stubs
	$(RELOCK_VENV)/bin/python -m kiln.envlock freeze --out $(LOCK) --target-dir $(RELOCK_VENV)/trt-stubs
	rm -rf $(RELOCK_VENV)
	@echo "$(LOCK) rewritten: reinstall with 'rm -rf $(VENV) && make test', then 'make lock' if artifacts changed"

run: $(STAMP)  ## run the pipeline on config.yaml
	$(BIN)/snakemake --cores $(CORES) --configfile config.yaml --rerun-incomplete --show-failed-logs
	$(BIN)/snakemake --cores $(CORES) --configfile config.yaml --report results/report/report.html
	@echo; cat results/report/summary.md; echo
	@echo "Summary:          $$(pwd)/results/report/summary.md"
	@echo "Kiln's page:      $$(pwd)/results/report/kiln.html"
	@echo "Snakemake report: $$(pwd)/results/report/report.html"

test: $(STAMP)  ## run the test suite
	@$(BIN)/python -m kiln.envlock check $(LOCK)
	KILN_TRT_STUBS=$(TRT_STUBS) KILN_TRITON_DIR=$(CURDIR)/$(TRITON)/server KILN_TRITON_SITE=$(CURDIR)/$(TRITON)/site \
		$(BIN)/python -m pytest

# The demo run in a clean temporary folder (models/ copied there), then `kiln $(1)` on its results.
# VERIFY_DIR=path runs in that folder instead and keeps it. kiln.lock holds no validations or baselines
# (timings), so those rules and what follows them are left out; VERIFY_OMIT= runs the whole demo.
VERIFY_OMIT ?= validate baseline
define clean_demo
	@set -e; dir="$${VERIFY_DIR:-$$(mktemp -d -t kiln-verify.XXXXXX)}"; \
	[ -n "$$VERIFY_DIR" ] || trap 'rm -rf "$$dir"' EXIT; \
	mkdir -p "$$dir" && cp -r models "$$dir/"; \
	echo "kiln: demo run in $$dir"; start=$$(date +%s); \
	$(BIN)/snakemake -s $(CURDIR)/Snakefile --directory "$$dir" --configfile $(CURDIR)/config.yaml \
		--cores $(CORES) --quiet rules $(if $(strip $(VERIFY_OMIT)),--omit-from $(VERIFY_OMIT)); \
	echo "kiln: demo run took $$(( $$(date +%s) - start )) s"; \
	$(BIN)/kiln $(1) --results "$$dir/results"
endef

verify: $(STAMP)  ## rerun the demo in a clean folder; list every artifact that differs from kiln.lock
	$(call clean_demo,verify --lock kiln.lock)

lock: $(STAMP)  ## rerun the demo in a clean folder and rewrite kiln.lock from it
	$(call clean_demo,lock --out kiln.lock)

lint: $(STAMP)
	$(BIN)/ruff check kiln tests scripts
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
