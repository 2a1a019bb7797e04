# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv, no MPI needed):
#   make demo   -> local virtual environment, install, reconstruct the built-in demo molecule
#   make test   -> local virtual environment, install, lint (ruff), serial tests + MPI tests on 2 and 3 ranks
PYTHON ?= python3
VENV   ?= .venv
NP     ?= 2
DEMO_ARGS ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo results test lint test-serial test-mpi test-mpi3 test-slow venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi,test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpiexec -n $(NP) $(BIN)/spinifel-mpi demo --out demo_out --overwrite $(DEMO_ARGS)

# the demo's numbers in README.md and docs/results.md, regenerated from demo_out/metrics.json
results: $(STAMP)
	$(BIN)/python scripts/results.py demo_out --block demo --command "make demo" --update README.md docs/results.md

test: $(STAMP)
	$(MAKE) lint test-serial test-mpi test-mpi3

lint: $(STAMP)
	$(BIN)/ruff check src tests

test-serial: $(STAMP)
	$(BIN)/python -m pytest -q

test-mpi: $(STAMP)
	$(BIN)/mpiexec -n 2 $(BIN)/python -m pytest -q --with-mpi -m "mpi and not slow" -p no:cacheprovider

# 3 ranks: uneven shards, phasing owners beyond rank 1, a ring of odd length
test-mpi3: $(STAMP)
	$(BIN)/mpiexec -n 3 $(BIN)/python -m pytest -q --with-mpi -m "mpi and not slow" -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info demo_out
