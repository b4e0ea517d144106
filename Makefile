# The two README commands: `make demo` (set up, compile the example plan, train on 2 ranks) and
# `make test` (set up, run the whole test suite). Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt -e .
	touch $@

demo: setup
	$(BIN)/dsc compile examples/gpt.py --config examples/plan.json --world-size 2 --out dsc_out
	$(BIN)/dsc run --nproc 2 examples/train.py --config examples/plan.json --steps 20

# Two pytest workers, each test module on one (modules share their launches between tests): a
# launch leaves cores idle while its ranks start, and the other worker fills them. On 2 cores the
# suite took 14m18s on one worker and 11m57s on two (with the eval-graph trim of the same commit).
PYTEST_ARGS ?= -n 2 --dist loadscope
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_dp.py
	$(BIN)/python benchmarks/bench_zero.py
	$(BIN)/python benchmarks/bench_tp.py
	$(BIN)/python benchmarks/bench_fusion.py
	$(BIN)/python benchmarks/bench_capture.py

clean:
	rm -rf $(VENV) dsc_out .pytest_cache
