# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on local disk; installing it first keeps a plain `torch` requirement
# from pulling a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install system-tools test lint demo demo-brain evidence fuzz mutants clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,codecs,itk,spark,anatomy,dicomweb]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The real tools the tests run against (dcmtk: dsrdump, storescu...; dicom3tools: dciodvfy; Orthanc and its DICOMweb
# plugin as the PACS; Chromium for the QA page's browser test), installed with apt where the system allows it (root,
# apt-get). Where they cannot be, the tests that need them are skipped, each named with its reason at the end of
# `make test` (pytest -rs).
SYSTEM_TOOLS := dcmtk dicom3tools orthanc orthanc-dicomweb chromium
system-tools:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $(SYSTEM_TOOLS) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $(SYSTEM_TOOLS) >/dev/null 2>&1; } || \
	  echo "system-tools: apt-get could not install $(SYSTEM_TOOLS); the tests that need them are skipped"; \
	else \
	  echo "system-tools: no apt-get as root here; the tests that need $(SYSTEM_TOOLS) are skipped"; \
	fi

# One pytest worker per core (pytest-xdist); each runs torch on one thread (tests/conftest.py). Prints the branch
# coverage of the package and fails under its floor (pyproject.toml, [tool.coverage.report]), and names every
# skipped test with its reason (-rs).
test: install lint system-tools
	$(BIN)/python -m pytest -q -rs -n auto --dist worksteal --cov --cov-report=term

# The main job on generated CT phantoms: train, calibrate, evaluate per artifact, gate (outputs in demo/).
demo: install
	$(BIN)/python pipelines/demo.py --out demo

# The same gate on brain-MR subjects made from the MNI152 template (artifacts, orientation errors, wrong modality).
demo-brain: install
	$(BIN)/python pipelines/demo.py --anatomy brain --out demo-brain

# Every benchmark and evidence script at CPU scale; rewrites each docs table between its markers (tools/evidence.py).
evidence: install
	$(BIN)/python tools/evidence.py

# Coverage-guided fuzzing of the readers behind iter_slices (atheris, the `fuzz` extra) from the seed corpus
# tests/fuzz/corpus for FUZZ_SECONDS: each input gets 10 s and 2 GiB; new inputs and crashers go to fuzz-findings/
# (a crasher is copied into tests/fuzz/crashers/ with its fix; tools/fuzz_readers.py).
FUZZ_SECONDS ?= 600
fuzz: install
	$(BIN)/python -m pip install -q -e ".[fuzz]"
	mkdir -p fuzz-findings/corpus
	$(BIN)/python tools/fuzz_readers.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
		-artifact_prefix=fuzz-findings/ fuzz-findings/corpus tests/fuzz/corpus

# Mutation testing (mutmut, the `mutants` extra) of the modules listed in pyproject's [tool.mutmut], one mutant per
# core at a time (about an hour on 2 cores), then the hand-made mutants mutmut cannot make; writes the table into
# docs/testing.md and exits 1 on a survivor that is neither killed by a test nor in tools/equivalent_mutants/.
mutants: install
	$(BIN)/python -m pip install -q -e ".[mutants]"
	$(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo demo-brain fuzz-findings mutants
