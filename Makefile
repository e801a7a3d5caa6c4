# Two commands set everything up on a fresh machine with Python >= 3.11 and make:
#   make demo   - the simulator and the daemon on loopback, sample faxes, live transitions
#   make test   - lint, types, layering, and the whole test suite
#   make dist   - the sdist and the wheel, into dist/ (installing them: README.md, "Install")
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit dist bench bench-quick clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "faxd needs Python >= 3.11, found " + sys.version)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/faxd demo

lint: $(STAMP)
	$(BIN)/ruff check faxd tests bench tools setup.py
	$(BIN)/ruff format --check faxd tests bench tools setup.py
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest

test: lint unit

# The sdist and a wheel built from it (python -m build), into dist/. A stale faxd.egg-info would add the
# files its SOURCES.txt lists to the sdist whatever MANIFEST.in says, so it goes first.
dist: $(STAMP)
	rm -rf dist build faxd.egg-info
	$(BIN)/python -m build --outdir dist .

# Every bench script (bench/README.md): each checks what it measured against its targets, exits 1 on a
# miss and writes bench/results/; one that misses or fails does not stop the others, and make bench fails
# at the end naming them. bench/summary.py then renders docs/benchmarks.md's summary table from the
# results. soak.py runs its 10-minute profile. make bench-quick: every script's reduced profile (--quick).
BENCH_SCRIPTS := latency footprint export api_efficiency fanout replay outlets soak
# issue 12's rate-budget benchmarks, each beside the baseline build (bench/budget.py); degradation writes
# docs/bench-degradation.png on its default profile.
BENCH_SCRIPTS += pressure degradation many_extensions transient sigterm
BENCH_ARGS :=
SCALING_PLOT := --plot docs/bench-scaling.png
$(VENV)/.bench-installed: pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	@failed=""; \
	for s in $(BENCH_SCRIPTS); do \
		if [ -f bench/$$s.py ]; then echo "== bench/$$s.py $(BENCH_ARGS)"; $(BIN)/python bench/$$s.py $(BENCH_ARGS) || failed="$$failed $$s"; fi; \
	done; \
	echo "== bench/scaling.py $(BENCH_ARGS)"; $(BIN)/python bench/scaling.py $(BENCH_ARGS) $(SCALING_PLOT) || failed="$$failed scaling"; \
	$(BIN)/python bench/summary.py || failed="$$failed summary"; \
	if [ -n "$$failed" ]; then echo "bench: missed targets or failed:$$failed"; exit 1; fi

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick SCALING_PLOT=

clean:
	rm -rf $(VENV) dist build faxd.egg-info .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
